// Package clusterca tests internal/clusterca, the node agent's Kubernetes
// client of cluster mode, against a real kube-apiserver (etcd and
// kube-apiserver on loopback, as root): certificate requests made with the
// agent's node-bound service account token and the RBAC of CLUSTER.md, the
// ClusterTrustBundle and JWKS ConfigMap watches, and ca.Authority on top.
// The signing side is a small stand-in for the controller, run as admin.
package clusterca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/clusterca"
	"github.com/csi-agent/csi-agent/internal/testutil"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

// Ports of this package's control plane (CLUSTER.md, agent helper).
const (
	apiServerPort = 17443
	etcdPort      = 23379
	namespace     = "csi-agent"
	node          = "node-a"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.test")

type env struct {
	dir        string // lives as long as the control plane
	once       sync.Once
	bin        string
	repo       string
	kubeconfig string // the agent's
	cp         *framework.ControlPlane
	agent      kubernetes.Interface // the agent's node-bound service account
	root       *testRoot
}

func setup(t *testing.T) *env {
	t.Helper()
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	home, _ := os.UserHomeDir()
	repo, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	cp, err := framework.StartControlPlane(ctx, framework.ControlPlaneOptions{
		Base: "/var/lib/csi-agent-clusterca-test", APIServerPort: apiServerPort, EtcdPort: etcdPort,
		ToolsDir: filepath.Join(repo, "tests/e2e/tools"), CacheDir: filepath.Join(home, ".cache", "csi-agent-e2e"), Logf: t.Logf,
	})
	t.Cleanup(func() {
		if t.Failed() {
			_ = cp.SaveLogs(filepath.Join(os.TempDir(), "csi-agent-clusterca-artifacts"))
		}
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cp.CreateNode(ctx, node); err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "agent.kubeconfig")
	if err := cp.ServiceAccountKubeconfig(ctx, namespace, "csi-agent", node, kc); err != nil {
		t.Fatal(err)
	}
	if err := grantAgent(ctx, cp.Client); err != nil {
		t.Fatal(err)
	}
	rc, err := clusterca.RESTConfig(kc)
	if err != nil {
		t.Fatal(err)
	}
	agent, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return &env{dir: t.TempDir(), repo: repo, kubeconfig: kc, cp: cp, agent: agent, root: newTestRoot(t)}
}

// grantAgent is the agent's RBAC of CLUSTER.md, nothing more.
func grantAgent(ctx context.Context, cs kubernetes.Interface) error {
	sa := []rbacv1.Subject{{Kind: "ServiceAccount", Name: "csi-agent", Namespace: namespace}}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "csi-agent"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"certificatesigningrequests"}, Verbs: []string{"create", "get", "list", "watch"}},
			{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"clustertrustbundles"}, Verbs: []string{"get", "list", "watch"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "csi-agent"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "csi-agent"},
		Subjects:   sa,
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := cs.RbacV1().Roles(namespace).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "csi-agent"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"},
			ResourceNames: []string{cluster.JWKSConfigMap}, Verbs: []string{"get", "list", "watch"}}},
	}, metav1.CreateOptions{}); err != nil {
		return err
	}
	_, err := cs.RbacV1().RoleBindings(namespace).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "csi-agent"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "csi-agent"},
		Subjects:   sa,
	}, metav1.CreateOptions{})
	return err
}

func newClient(t *testing.T, e *env) *clusterca.Client {
	t.Helper()
	c, err := clusterca.New(e.agent, clusterca.Options{
		TrustDomain: td, NodeName: node, Namespace: namespace,
		IntermediateSigner: cluster.IntermediateSigner, JWTKeySigner: cluster.JWTKeySigner, BundleSigner: cluster.SVIDSigner,
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// run runs c until the test ends.
func run(t *testing.T, c interface{ Run(context.Context) error }) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// One control plane for every case: starting one costs seconds.
func TestClusterCA(t *testing.T) {
	e := setup(t)
	t.Run("intermediate", func(t *testing.T) { testIntermediate(t, e) })
	t.Run("denied", func(t *testing.T) { testDenied(t, e) })
	t.Run("trust", func(t *testing.T) { testTrust(t, e) })
	t.Run("authority", func(t *testing.T) { testAuthority(t, e) })
	t.Run("binary", func(t *testing.T) { testBinary(t, e) })
	t.Run("controller", func(t *testing.T) { testController(t, e) })
}

// The request the controller sees is the contract's; the answer comes back
// through the watch.
func testIntermediate(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newClient(t, e)
	seen := make(chan *certv1.CertificateSigningRequest, 1)
	e.sign(ctx, t, func(csr *certv1.CertificateSigningRequest) error {
		seen <- csr.DeepCopy()
		return nil
	})
	key, csrDER := newCSR(t)
	chain, err := c.SignIntermediate(ctx, csrDER, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !key.PublicKey.Equal(chain[0].PublicKey) || !chain[0].IsCA {
		t.Fatal("issued certificate is not a CA for the requested key")
	}
	csr := <-seen
	checks := []struct {
		what      string
		got, want any
	}{
		{"signer", csr.Spec.SignerName, cluster.IntermediateSigner},
		{"username", csr.Spec.Username, "system:serviceaccount:" + namespace + ":csi-agent"},
		{"node extra", strings.Join(csr.Spec.Extra[cluster.NodeNameExtra], ","), node},
		{"usages", usages(csr.Spec.Usages), "cert sign,crl sign"},
		{"expirationSeconds", *csr.Spec.ExpirationSeconds, int32(3600)},
		{"name prefix", strings.HasPrefix(csr.Name, "csi-agent-"+node+"-"), true},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("CSR %s = %v, want %v", c.what, c.got, c.want)
		}
	}
}

// A denial ends the wait with the controller's words.
func testDenied(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newClient(t, e)
	e.sign(ctx, t, func(*certv1.CertificateSigningRequest) error { return errors.New("node is being deleted") })
	_, csrDER := newCSR(t)
	_, err := c.RegisterJWTKey(ctx, csrDER, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "node is being deleted") || !strings.Contains(err.Error(), cluster.ReasonDenied) {
		t.Fatalf("RegisterJWTKey of a denied request: %v", err)
	}
}

func testTrust(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := e.cp.Client
	c := newClient(t, e)
	run(t, c)
	waitTrust(t, c, "the first (empty) list", func(tr ca.Trust) bool { return len(tr.Roots) == 0 && len(tr.JWTKeys) == 0 })

	other := newTestRoot(t)
	ctbs := admin.CertificatesV1().ClusterTrustBundles()
	ctb := &certv1.ClusterTrustBundle{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.TrustBundleName(cluster.SVIDSigner, td), Labels: map[string]string{cluster.TrustDomainLabel: td.Name()}},
		Spec:       certv1.ClusterTrustBundleSpec{SignerName: cluster.SVIDSigner, TrustBundle: e.root.pem()},
	}
	ctb, err := ctbs.Create(ctx, ctb, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Another trust domain's bundle of the same signer is not ours.
	if _, err := ctbs.Create(ctx, &certv1.ClusterTrustBundle{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.TrustBundleName(cluster.SVIDSigner, spiffeid.RequireTrustDomainFromString("other.test")),
			Labels: map[string]string{cluster.TrustDomainLabel: "other.test"}},
		Spec: certv1.ClusterTrustBundleSpec{SignerName: cluster.SVIDSigner, TrustBundle: other.pem()},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitTrust(t, c, "our root", func(tr ca.Trust) bool { return len(tr.Roots) == 1 && tr.Roots[0].Equal(e.root.cert) })

	changed := c.Changed()
	next := newTestRoot(t)
	ctb.Spec.TrustBundle = e.root.pem() + next.pem()
	if _, err := ctbs.Update(ctx, ctb, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("Changed did not fire on a new root")
	}
	waitTrust(t, c, "both roots", func(tr ca.Trust) bool { return len(tr.Roots) == 2 })

	k1, k2 := jwtKey(t, "node-a"), jwtKey(t, "node-b")
	cms := admin.CoreV1().ConfigMaps(namespace)
	cm, err := cms.Create(ctx, jwksConfigMap(t, k1), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitTrust(t, c, "one JWT key", func(tr ca.Trust) bool { return len(tr.JWTKeys) == 1 && tr.JWTKeys[0].KeyID == k1.KeyID })

	// A ConfigMap that does not parse keeps the last good keys.
	cm.Data[cluster.JWKSKey] = `{"keys":[{"node":""}]}`
	if cm, err = cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if tr, _ := c.Trust(); len(tr.JWTKeys) != 1 || tr.JWTKeys[0].KeyID != k1.KeyID {
		t.Fatalf("a broken JWKS replaced the last good keys: %+v", tr.JWTKeys)
	}
	cm.Data = jwksConfigMap(t, k1, k2).Data
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitTrust(t, c, "two JWT keys", func(tr ca.Trust) bool { return len(tr.JWTKeys) == 2 })
}

// ca.Authority in cluster mode over the real client: ready once the
// stand-in controller signed, and its SVIDs verify against the bundle it
// serves from the ClusterTrustBundle.
func testAuthority(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newClient(t, e)
	run(t, c)
	e.sign(ctx, t, func(*certv1.CertificateSigningRequest) error { return nil })
	a, err := ca.New(ctx, ca.Options{
		TrustDomain: td, StateDir: t.TempDir(), X509SVIDTTL: 5 * time.Minute, JWTSVIDTTL: time.Minute, IntermediateTTL: time.Hour,
		Cluster: &ca.ClusterOptions{NodeName: node, Signer: c, Trust: c},
	})
	if err != nil {
		t.Fatal(err)
	}
	run(t, a)
	if err := a.WaitReady(ctx); err != nil {
		t.Fatalf("authority not ready: %v (%v)", err, a.Ready())
	}
	svid, err := a.MintX509SVID(ctx, spiffeid.RequireFromPath(td, "/ns/default/sa/web"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, a.Bundle()); err != nil {
		t.Fatalf("X.509-SVID does not verify against the served bundle: %v", err)
	}
}

func waitTrust(t *testing.T, c *clusterca.Client, what string, cond func(ca.Trust) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		tr, ok := c.Trust()
		if ok && cond(tr) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: synced %v, %d roots, %d JWT keys", what, ok, len(tr.Roots), len(tr.JWTKeys))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sign starts the stand-in controller: it answers every request of our
// signers not answered yet, approving and signing when check passes and
// denying otherwise, until ctx ends. JWT keys go to the JWKS ConfigMap, as
// the controller does. An informer, not a bare watch: it lists again when a
// watch fails (the API server's watch cache lags on a fresh etcd).
func (e *env) sign(ctx context.Context, t *testing.T, check func(*certv1.CertificateSigningRequest) error) {
	inf := informers.NewSharedInformerFactory(e.cp.Client, 0).Certificates().V1().CertificateSigningRequests().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: func(o any) {
		csr, ok := o.(*certv1.CertificateSigningRequest)
		if !ok || len(csr.Status.Conditions) > 0 {
			return
		}
		if err := e.answer(ctx, csr.DeepCopy(), check); err != nil && ctx.Err() == nil {
			t.Errorf("answer %s: %v", csr.Name, err)
		}
	}}); err != nil {
		t.Fatal(err)
	}
	go inf.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		t.Fatal("CSR informer did not sync")
	}
}

func (e *env) answer(ctx context.Context, csr *certv1.CertificateSigningRequest, check func(*certv1.CertificateSigningRequest) error) error {
	csrs := e.cp.Client.CertificatesV1().CertificateSigningRequests()
	if err := check(csr); err != nil {
		csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
			Type: certv1.CertificateDenied, Status: corev1.ConditionTrue, Reason: cluster.ReasonDenied, Message: err.Error()})
		_, err := csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{})
		return err
	}
	b, _ := pem.Decode(csr.Spec.Request)
	if b == nil {
		return errors.New("request is not PEM")
	}
	req, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return err
	}
	isCA := csr.Spec.SignerName == cluster.IntermediateSigner
	cert := e.root.issue(req, time.Duration(*csr.Spec.ExpirationSeconds)*time.Second, isCA)
	csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
		Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: cluster.ReasonApproved, Message: "test"})
	if csr, err = csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
		return err
	}
	if !isCA {
		kid, _ := cluster.KeyID(cert.PublicKey)
		cm := jwksConfigMap(nil, cluster.JWTKey{Node: node, KeyID: kid, Public: cert.PublicKey, NotAfter: cert.NotAfter})
		cms := e.cp.Client.CoreV1().ConfigMaps(namespace)
		if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
			if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				return err
			}
		}
	}
	csr.Status.Certificate = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	_, err = csrs.UpdateStatus(ctx, csr, metav1.UpdateOptions{})
	return err
}

type testRoot struct {
	t    *testing.T
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	mu   sync.Mutex
	n    int64
}

func newTestRoot(t *testing.T) *testRoot {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"}, URIs: []*url.URL{td.ID().URL()},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testRoot{t: t, cert: cert, key: key, n: 1}
}

func (r *testRoot) pem() string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.cert.Raw}))
}

func (r *testRoot) issue(req *x509.CertificateRequest, ttl time.Duration, isCA bool) *x509.Certificate {
	r.mu.Lock()
	r.n++
	serial := r.n
	r.mu.Unlock()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: req.Subject, URIs: req.URIs,
		NotBefore: now.Add(-10 * time.Second), NotAfter: now.Add(ttl), KeyUsage: x509.KeyUsageDigitalSignature,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
		tmpl.BasicConstraintsValid, tmpl.IsCA, tmpl.MaxPathLenZero = true, true, true
		tmpl.PermittedURIDomains = []string{td.Name()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.cert, req.PublicKey, r.key)
	if err != nil {
		r.t.Error(err)
		return nil
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

func newCSR(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := cluster.NodeID(td, node)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

func jwtKey(t *testing.T, nodeName string) cluster.JWTKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := cluster.KeyID(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return cluster.JWTKey{Node: nodeName, KeyID: kid, Public: &key.PublicKey, NotAfter: time.Now().Add(time.Hour)}
}

func jwksConfigMap(t *testing.T, keys ...cluster.JWTKey) *corev1.ConfigMap {
	data, err := cluster.MarshalJWKS(keys)
	if err != nil && t != nil {
		t.Fatal(err)
	}
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.JWKSConfigMap, Namespace: namespace, Labels: map[string]string{cluster.TrustDomainLabel: td.Name()}},
		Data:       map[string]string{cluster.JWKSKey: string(data)},
	}
}

func usages(us []certv1.KeyUsage) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = string(u)
	}
	return strings.Join(s, ",")
}

// The binary in cluster mode: not serving until the cluster signed; then
// SVIDs that verify against the bundles it serves; restarted while the API
// server is down, it serves on the persisted intermediate and bundle.
func testBinary(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin := e.build(ctx, t)
	sock, cfg := e.agentConfig(t)
	start := func() {
		t.Helper()
		if err := e.cp.StartProcess("agent", bin, "run", "--config", cfg); err != nil {
			t.Fatal(err)
		}
	}
	start()
	defer func() { _ = e.cp.StopProcess("agent", 5*time.Second) }()
	waitHealth(ctx, t, e, "agent", sock, healthpb.HealthCheckResponse_NOT_SERVING)
	short, stop := context.WithTimeout(ctx, time.Second)
	_, err := workloadapi.FetchX509SVID(short, workloadapi.WithAddr("unix://"+sock))
	stop()
	if err == nil {
		t.Fatal("an X.509-SVID before the cluster signed an intermediate")
	}

	e.sign(ctx, t, func(*certv1.CertificateSigningRequest) error { return nil })
	waitHealth(ctx, t, e, "agent", sock, healthpb.HealthCheckResponse_SERVING)
	first := fetchVerified(ctx, t, sock)
	fetchJWTVerified(ctx, t, sock)

	if err := e.cp.StopProcess("agent", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := e.cp.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	start()
	waitHealth(ctx, t, e, "agent", sock, healthpb.HealthCheckResponse_SERVING)
	again := fetchVerified(ctx, t, sock)
	if !again.Certificates[1].Equal(first.Certificates[1]) {
		t.Error("restarted without the API server, the agent signs with another intermediate than the persisted one")
	}
	if err := e.cp.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
}

// build builds the binary once.
func (e *env) build(ctx context.Context, t *testing.T) string {
	t.Helper()
	e.once.Do(func() {
		e.bin = filepath.Join(e.dir, "csi-agent")
		build := exec.CommandContext(ctx, "go", "build", "-o", e.bin, "./cmd/csi-agent")
		build.Dir = e.repo
		if out, err := build.CombinedOutput(); err != nil {
			e.bin = ""
			t.Errorf("build: %v\n%s", err, out)
		}
	})
	if e.bin == "" {
		t.FailNow()
	}
	return e.bin
}

// agentConfig writes a cluster-mode config with its own state directory.
func (e *env) agentConfig(t *testing.T) (sock, cfg string) {
	t.Helper()
	dir := t.TempDir()
	sock = filepath.Join(dir, "sockets", "agent.sock")
	cfg = filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`trustDomain: %s
stateDir: %s
nodeName: %s
workloadAPI: {socketDir: %s}
ca:
  mode: cluster
  jwtIssuer: https://oidc.cluster.test
  cluster: {kubeconfig: %s, intermediateTTL: 1h}
  x509SVIDTTL: 10m
svids:
- spiffeID: /unix/uid/{unix.uid}
  rules: [{match: {unix.uid: "0"}}]
`, td.Name(), filepath.Join(dir, "state"), node, filepath.Dir(sock), e.kubeconfig)), 0o600); err != nil {
		t.Fatal(err)
	}
	return sock, cfg
}

// fetchJWTVerified fetches a JWT-SVID (waiting for the JWT key to be
// published, a moment after the intermediate) and validates it against
// the JWT bundle the agent serves.
func fetchJWTVerified(ctx context.Context, t *testing.T, sock string) {
	t.Helper()
	addr := workloadapi.WithAddr("unix://" + sock)
	var token string
	for token == "" {
		svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "aud"}, addr)
		if err == nil {
			token = svid.Marshal()
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("no JWT-SVID: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	jwtBundles, err := workloadapi.FetchJWTBundles(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := jwtsvid.ParseAndValidate(token, jwtBundles, []string{"aud"})
	if err != nil {
		t.Fatalf("JWT-SVID does not validate against the served JWT bundle: %v", err)
	}
	if svid.Claims["iss"] != "https://oidc.cluster.test" {
		t.Errorf("iss = %v", svid.Claims["iss"])
	}
}

// The real controller (csi-agent controller) certifies the agent.
func testController(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	bin := e.build(ctx, t)
	// What the stand-in published goes; the controller publishes its own.
	admin := e.cp.Client
	_ = admin.CertificatesV1().ClusterTrustBundles().Delete(ctx, cluster.TrustBundleName(cluster.SVIDSigner, td), metav1.DeleteOptions{})
	_ = admin.CoreV1().ConfigMaps(namespace).Delete(ctx, cluster.JWKSConfigMap, metav1.DeleteOptions{})
	ctl := filepath.Join(t.TempDir(), "controller.yaml")
	if err := os.WriteFile(ctl, []byte(fmt.Sprintf("trustDomain: %s\ncontroller: {namespace: %s, identity: test}\n", td.Name(), namespace)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.cp.StartProcess("controller", bin, "controller", "--config", ctl, "--kubeconfig", e.cp.Kubeconfig); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.cp.StopProcess("controller", 5*time.Second) }()
	sock, cfg := e.agentConfig(t)
	if err := e.cp.StartProcess("agent-2", bin, "run", "--config", cfg); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = e.cp.StopProcess("agent-2", 5*time.Second) }()
	waitHealth(ctx, t, e, "agent-2", sock, healthpb.HealthCheckResponse_SERVING)
	fetchVerified(ctx, t, sock)
	fetchJWTVerified(ctx, t, sock)
}

// fetchVerified fetches an X.509-SVID and checks it against the X.509
// bundle the agent serves, the chain ending in this node's intermediate.
func fetchVerified(ctx context.Context, t *testing.T, sock string) *x509svid.SVID {
	t.Helper()
	addr := workloadapi.WithAddr("unix://" + sock)
	svid, err := workloadapi.FetchX509SVID(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	bundles, err := workloadapi.FetchX509Bundles(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundles); err != nil {
		t.Fatalf("X.509-SVID does not verify against the served bundle: %v", err)
	}
	want, _ := cluster.NodeID(td, node)
	if len(svid.Certificates) != 2 || len(svid.Certificates[1].URIs) != 1 || svid.Certificates[1].URIs[0].String() != want.String() {
		t.Fatalf("chain is not leaf + this node's intermediate (%s)", want)
	}
	return svid
}

// waitHealth waits for the agent's gRPC health to report want.
func waitHealth(ctx context.Context, t *testing.T, e *env, proc, sock string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var last any
	for {
		if err := e.cp.ProcessExited(proc); err != nil {
			t.Fatal(err)
		}
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && resp.Status == want {
			return
		}
		last = err
		if err == nil {
			last = resp.Status
		}
		select {
		case <-ctx.Done():
			t.Fatalf("health never %s (last: %v); log %s", want, last, e.cp.LogPath(proc))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
