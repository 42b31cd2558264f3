package podcert

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	certinformers "k8s.io/client-go/informers/certificates/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/csi-agent/csi-agent/attestor/field"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
	"github.com/csi-agent/csi-agent/internal/podcert"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

var td = spiffeid.RequireTrustDomainFromString("podcert-test.example")

// env is one test's world: a node, the node's client (as its kubelet), the
// signer running in-process with a throwaway root.
type env struct {
	cp       *framework.ControlPlane
	ns, node string
	nodeUID  string
	kubelet  kubernetes.Interface
	root     *x509.Certificate
}

// signerUser is who the in-process signer authenticates as; its RBAC is
// what deploy/ grants the controller for pod certificates, nothing more.
const signerUser = "csi-agent-podcert-signer"

func setup(t *testing.T, name string) *env {
	t.Helper()
	cp := requireControlPlane(t)
	ctx := t.Context()
	e := &env{cp: cp, ns: name, node: "node-" + name}
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: e.ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	n, err := cp.CreateNode(ctx, e.node)
	if err != nil {
		t.Fatal(err)
	}
	e.nodeUID = string(n.UID)
	for _, sa := range []string{"web", "stranger"} {
		if err := cp.EnsureServiceAccount(ctx, e.ns, sa); err != nil {
			t.Fatal(err)
		}
	}
	kubeletCfg, err := cp.UserConfig("system:node:"+e.node, []string{"system:nodes"})
	if err != nil {
		t.Fatal(err)
	}
	if e.kubelet, err = kubernetes.NewForConfig(kubeletCfg); err != nil {
		t.Fatal(err)
	}
	grantSigner(t, cp)
	signerCfg, err := cp.UserConfig(signerUser, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The rate limit csi-agent controller gives the signer's own client
	// (config.DefaultPodCertQPS, config.DefaultPodCertBurst); PODCERT_QPS=5
	// shows client-go's default (burst twice the QPS).
	signerCfg.QPS, signerCfg.Burst = 50, 100
	if s := os.Getenv("PODCERT_QPS"); s != "" {
		q, err := strconv.Atoi(s)
		if err != nil || q < 1 {
			t.Fatalf("PODCERT_QPS=%q", s)
		}
		signerCfg.QPS, signerCfg.Burst = float32(q), 2*q
	}
	signerClient, err := kubernetes.NewForConfig(signerCfg)
	if err != nil {
		t.Fatal(err)
	}

	// The controller's own signer (rootca.Holder) with a fresh root.
	root, err := issue.Root(td, time.Now(), 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e.root = root.Cert
	holder := rootca.NewHolder(td, nil)
	holder.Set(rootca.State{Current: root, Managed: true})
	set, err := rules.Compile(td, []rules.SVID{{
		SPIFFEID: "/ns/{" + field.K8sNamespace + "}/sa/{" + field.K8sServiceAccount + "}/pod/{" + field.K8sPodName + "}",
		Rules:    []rules.Rule{{Match: map[string]string{field.K8sServiceAccount: "web"}}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := podcert.New(signerClient, podcert.Options{TrustDomain: td, Rules: set, Signer: holder, MaxTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("signer: %v", err)
		}
		bg := context.Background()
		_ = cp.Client.CoreV1().Namespaces().Delete(bg, e.ns, metav1.DeleteOptions{})
		_ = cp.Client.CoreV1().Nodes().Delete(bg, e.node, metav1.DeleteOptions{})
	})
	return e
}

var grantOnce sync.Once

// grantSigner gives signerUser exactly the pod-certificate part of the
// controller's RBAC (deploy/): read PodCertificateRequests, write their
// status, "sign" for our signer name only, read pods, nodes and service
// accounts.
func grantSigner(t *testing.T, cp *framework.ControlPlane) {
	grantOnce.Do(func() {
		ctx := context.Background()
		role := &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: signerUser},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"podcertificaterequests"}, Verbs: []string{"get", "list", "watch"}},
				{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"podcertificaterequests/status"}, Verbs: []string{"update"}},
				{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"signers"}, ResourceNames: []string{cluster.SVIDSigner}, Verbs: []string{"sign"}},
				{APIGroups: []string{""}, Resources: []string{"pods", "nodes", "serviceaccounts"}, Verbs: []string{"get"}},
			},
		}
		binding := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: signerUser},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: signerUser},
			Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: signerUser}},
		}
		if _, err := cp.Client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
		if _, err := cp.Client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	})
}

// pod creates a pod bound to the env's node, with a podCertificate volume
// for our signer (what node-restriction admission requires of a request).
func (e *env) pod(t testing.TB, name, sa string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: e.ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName: e.node, ServiceAccountName: sa, AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10"}},
			Volumes: []corev1.Volume{{Name: "svid", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{{PodCertificate: &corev1.PodCertificateProjection{
					SignerName: cluster.SVIDSigner, KeyType: "ECDSAP256", CredentialBundlePath: "svid.pem",
				}}},
			}}}},
		},
	}
	p, err := e.cp.Client.CoreV1().Pods(e.ns).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// request creates a PodCertificateRequest for pod as its node's kubelet
// does: stub CSR signed by key, owner reference to the pod.
func (e *env) request(t testing.TB, p *corev1.Pod, key crypto.Signer, maxExpiration int32) *certv1.PodCertificateRequest {
	t.Helper()
	pcr, err := e.create(e.kubelet, p, key, maxExpiration)
	if err != nil {
		t.Fatal(err)
	}
	return pcr
}

func (e *env) create(as kubernetes.Interface, p *corev1.Pod, key crypto.Signer, maxExpiration int32) (*certv1.PodCertificateRequest, error) {
	ctx := context.Background()
	sa, err := e.cp.Client.CoreV1().ServiceAccounts(e.ns).Get(ctx, p.Spec.ServiceAccountName, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	pcr := &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: e.ns, GenerateName: "req-",
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Pod", Name: p.Name, UID: p.UID}},
		},
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: cluster.SVIDSigner,
			PodName:    p.Name, PodUID: p.UID,
			ServiceAccountName: sa.Name, ServiceAccountUID: sa.UID,
			NodeName: types.NodeName(e.node), NodeUID: types.UID(e.nodeUID),
			MaxExpirationSeconds: ptr.To(maxExpiration),
			StubPKCS10Request:    csr,
		},
	}
	pcr, err = as.CertificatesV1().PodCertificateRequests(e.ns).Create(ctx, pcr, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create PodCertificateRequest for %s/%s: %w", e.ns, p.Name, err)
	}
	return pcr, nil
}

// wait polls until the request is issued, denied or failed.
func (e *env) wait(t testing.TB, pcr *certv1.PodCertificateRequest) *certv1.PodCertificateRequest {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		got, err := e.cp.Client.CertificatesV1().PodCertificateRequests(e.ns).Get(context.Background(), pcr.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Status.Conditions) > 0 {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("PodCertificateRequest %s/%s not decided in 30s", e.ns, pcr.Name)
	return nil
}

// verify checks an Issued request: the chain verifies to the root, as an
// X.509-SVID of wantID, for the request's key.
func (e *env) verify(t testing.TB, pcr *certv1.PodCertificateRequest, key crypto.Signer, wantID string) *x509.Certificate {
	t.Helper()
	c := pcr.Status.Conditions
	if len(c) != 1 || c[0].Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("conditions %+v, want Issued", c)
	}
	var chain []*x509.Certificate
	for rest := []byte(pcr.Status.CertificateChain); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, []*x509.Certificate{e.root}))
	if err != nil {
		t.Fatalf("chain does not verify to the root: %v", err)
	}
	if id.String() != wantID {
		t.Fatalf("SPIFFE ID %s, want %s", id, wantID)
	}
	leaf := chain[0]
	if !leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(key.Public()) {
		t.Fatal("leaf certifies another key")
	}
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if want := leaf.NotBefore.Add(life / 2); !pcr.Status.BeginRefreshAt.Time.Equal(want) {
		t.Errorf("beginRefreshAt %s, want half life %s", pcr.Status.BeginRefreshAt.Time, want)
	}
	return leaf
}

func ecKey(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestIssuedWithTheRulesID(t *testing.T) {
	e := setup(t, "issued")
	p := e.pod(t, "web-0", "web")
	tests := []struct {
		name          string
		maxExpiration int32
		wantLife      time.Duration
	}{
		{"API minimum", 3600, time.Hour},
		{"two hours", 7200, 2 * time.Hour},
		{"above our cap", 7 * 24 * 3600, 24 * time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := ecKey(t)
			got := e.wait(t, e.request(t, p, key, tt.maxExpiration))
			leaf := e.verify(t, got, key, "spiffe://podcert-test.example/ns/issued/sa/web/pod/web-0")
			if life := leaf.NotAfter.Sub(leaf.NotBefore); life != tt.wantLife {
				t.Errorf("lifetime %s, want %s", life, tt.wantLife)
			}
		})
	}
}

func TestDenied(t *testing.T) {
	e := setup(t, "denied")
	stranger := e.pod(t, "stranger-0", "stranger")
	web := e.pod(t, "web-0", "web")
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		pod        *corev1.Pod
		key        crypto.Signer
		wantReason string
		wantInMsg  string
	}{
		{"no rule for the service account", stranger, ecKey(t), podcert.ReasonNoMatchingRule,
			"no SVID rule of trust domain podcert-test.example matches pod denied/stranger-0 (service account stranger, node node-denied)"},
		{"Ed25519 key", web, edKey, certv1.PodCertificateRequestConditionUnsupportedKeyType, `keyType "ECDSAP256"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := e.wait(t, e.request(t, tt.pod, tt.key, 3600))
			c := got.Status.Conditions
			if len(c) != 1 || c[0].Type != certv1.PodCertificateRequestConditionTypeDenied || c[0].Reason != tt.wantReason ||
				!strings.Contains(c[0].Message, tt.wantInMsg) || got.Status.CertificateChain != "" {
				t.Fatalf("status %+v, want Denied %s with %q", got.Status, tt.wantReason, tt.wantInMsg)
			}
		})
	}
}

// TestNotFromTheNode: a request created by someone other than the node
// (here an admin; node-restriction admission judges only nodes) for a pod
// it does not describe is denied by the signer's own API check.
func TestNotFromTheNode(t *testing.T) {
	e := setup(t, "forged")
	p := e.pod(t, "web-0", "web")
	p.UID = "00000000-0000-0000-0000-000000000000"
	pcr, err := e.create(e.cp.Client, p, ecKey(t), 3600)
	if err != nil {
		t.Fatal(err)
	}
	c := e.wait(t, pcr).Status.Conditions
	if len(c) != 1 || c[0].Type != certv1.PodCertificateRequestConditionTypeDenied || c[0].Reason != podcert.ReasonPodMismatch ||
		!strings.Contains(c[0].Message, "the pod was replaced") {
		t.Fatalf("conditions %+v, want Denied %s", c, podcert.ReasonPodMismatch)
	}
}

// TestIssueLatency measures PodCertificateRequest created → Issued over
// PODCERT_PODS pods (default 50), one request each, created at once.
func TestIssueLatency(t *testing.T) {
	n := 50
	if s := os.Getenv("PODCERT_PODS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 1 {
			t.Fatalf("PODCERT_PODS=%q", s)
		}
	}
	e := setup(t, "latency")
	pods := make([]*corev1.Pod, n)
	for i := range pods {
		pods[i] = e.pod(t, fmt.Sprintf("web-%d", i), "web")
	}
	// One request first: on a fresh API server the watch cache of a
	// resource nobody has written yet sends the signer's first watch back
	// ("too large resource version") and its informer re-lists ~1s later,
	// which is start-up, not issuance.
	warm := e.pod(t, "warm-up", "web")
	if c := e.wait(t, e.request(t, warm, ecKey(t), 3600)).Status.Conditions; c[0].Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("warm-up request: %+v", c)
	}
	// An informer, as the kubelet watches: it rides out the watch cache's
	// start ("too large resource version") that a bare watch reports.
	var mu sync.Mutex
	created := map[string]time.Time{}
	issued := map[string]time.Time{}
	refused := make(chan string, n)
	all := make(chan struct{})
	informer := certinformers.NewFilteredPodCertificateRequestInformer(e.cp.Client, e.ns, 0, cache.Indexers{}, nil)
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(_, obj any) {
		at := time.Now()
		pcr := obj.(*certv1.PodCertificateRequest)
		if len(pcr.Status.Conditions) == 0 {
			return
		}
		if c := pcr.Status.Conditions[0]; c.Type != certv1.PodCertificateRequestConditionTypeIssued {
			refused <- fmt.Sprintf("%s: %s %s: %s", pcr.Name, c.Type, c.Reason, c.Message)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if _, ok := issued[pcr.Name]; !ok {
			issued[pcr.Name] = at
			if len(issued) == n {
				close(all)
			}
		}
	}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go informer.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		t.Fatal("informer not synced")
	}

	keys := make([]crypto.Signer, n)
	for i := range keys {
		keys[i] = ecKey(t)
	}
	var wg sync.WaitGroup
	defer wg.Wait() // before any Fatal returns: the goroutines report with t
	for i, p := range pods {
		wg.Go(func() {
			t0 := time.Now()
			pcr, err := e.create(e.kubelet, p, keys[i], 3600)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			created[pcr.Name] = t0
			mu.Unlock()
		})
	}
	select {
	case <-all:
	case msg := <-refused:
		t.Fatal(msg)
	case <-time.After(2 * time.Minute):
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("%d of %d issued in 2m", len(issued), n)
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	lat := make([]time.Duration, 0, n)
	for name, at := range issued {
		lat = append(lat, at.Sub(created[name]))
	}
	slices.Sort(lat)
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	t.Logf("PodCertificateRequest created → Issued over %d pods: p50 %s, p99 %s, max %s",
		n, pct(0.50).Round(time.Millisecond), pct(0.99).Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond))
}
