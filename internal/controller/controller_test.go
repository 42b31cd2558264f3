package controller

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func testOptions() Options {
	return Options{
		TrustDomain: td, Namespace: "csi-agent", RootSecret: cluster.RootSecret, JWKSConfigMap: cluster.JWKSConfigMap,
		IntermediateSigner: cluster.IntermediateSigner, JWTKeySigner: cluster.JWTKeySigner, SVIDSigner: cluster.SVIDSigner,
		AgentServiceAccounts: []string{"csi-agent:csi-agent"},
		RootTTL:              8760 * time.Hour, RootActivationDelay: time.Minute,
		MaxIntermediateTTL: 24 * time.Hour, DefaultIntermediateTTL: 6 * time.Hour, RootPoll: 50 * time.Millisecond,
	}
}

// start runs a controller on client until the test ends.
func start(t *testing.T, client kubernetes.Interface) *Controller {
	t.Helper()
	return startWith(t, client, testOptions())
}

// startWith is start with options o.
func startWith(t *testing.T, client kubernetes.Interface, o Options) *Controller {
	t.Helper()
	c, err := New(client, o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return c
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func createCSR(t *testing.T, client kubernetes.Interface, name, signer, node, sanNode string) *ecdsa.PrivateKey {
	t.Helper()
	csr, key := csrWithKey(t, name, signer, td, sanNode)
	csr.Spec.Username = "system:serviceaccount:csi-agent:csi-agent"
	csr.Spec.Extra = map[string]certv1.ExtraValue{cluster.NodeNameExtra: {node}}
	if _, err := client.CertificatesV1().CertificateSigningRequests().Create(context.Background(), csr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return key
}

func csrObject(t *testing.T, name, signer string, td spiffeid.TrustDomain, sanNode string) *certv1.CertificateSigningRequest {
	csr, _ := csrWithKey(t, name, signer, td, sanNode)
	return csr
}

// csrWithKey is a node agent's CSR as it makes it (the API server fills in
// the username and extra).
func csrWithKey(t *testing.T, name, signer string, td spiffeid.TrustDomain, sanNode string) (*certv1.CertificateSigningRequest, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id, err := cluster.NodeID(td, sanNode)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	usages := []certv1.KeyUsage{certv1.UsageCertSign, certv1.UsageCRLSign}
	if signer == cluster.JWTKeySigner || strings.HasSuffix(signer, "/node-jwt-key") {
		usages = []certv1.KeyUsage{certv1.UsageDigitalSignature}
	}
	return &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: certv1.CertificateSigningRequestSpec{
			SignerName: signer, Usages: usages,
			Request: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
		},
	}, key
}

func getCSR(t *testing.T, client kubernetes.Interface, name string) *certv1.CertificateSigningRequest {
	t.Helper()
	csr, err := client.CertificatesV1().CertificateSigningRequests().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func hasCondition(csr *certv1.CertificateSigningRequest, typ certv1.RequestConditionType, reason string) bool {
	for _, c := range csr.Status.Conditions {
		if c.Type == typ && c.Reason == reason {
			return true
		}
	}
	return false
}

func bundleRoots(t *testing.T, client kubernetes.Interface) []*x509.Certificate {
	t.Helper()
	ctb, err := client.CertificatesV1().ClusterTrustBundles().Get(context.Background(), cluster.TrustBundleName(cluster.SVIDSigner, td), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if ctb.Spec.SignerName != cluster.SVIDSigner || ctb.Labels[cluster.TrustDomainLabel] != "example.org" {
		t.Fatalf("trust bundle signer %q labels %v", ctb.Spec.SignerName, ctb.Labels)
	}
	certs, err := ca.ParseCertificatesPEM([]byte(ctb.Spec.TrustBundle))
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

func jwksKeys(t *testing.T, client kubernetes.Interface) []cluster.JWTKey {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps("csi-agent").Get(context.Background(), cluster.JWKSConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	keys, err := cluster.ParseJWKS([]byte(cm.Data[cluster.JWKSKey]))
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

func TestControllerSignsDeniesAndPublishes(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	start(t, client)

	eventually(t, "the trust bundle", func() bool { return len(bundleRoots(t, client)) == 1 })
	sec, err := client.CoreV1().Secrets("csi-agent").Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	if err != nil || sec.Annotations[rootca.AnnotationManagedBy] != rootca.ManagedBy || sec.Type != corev1.SecretTypeTLS {
		t.Fatalf("root secret %v: %v", sec, err)
	}
	root := bundleRoots(t, client)[0]

	key := createCSR(t, client, "inter-a", cluster.IntermediateSigner, "node-a", "node-a")
	eventually(t, "the intermediate", func() bool { return len(getCSR(t, client, "inter-a").Status.Certificate) > 0 })
	csr := getCSR(t, client, "inter-a")
	if !hasCondition(csr, certv1.CertificateApproved, cluster.ReasonApproved) {
		t.Fatalf("conditions %+v", csr.Status.Conditions)
	}
	b, rest := pem.Decode(csr.Status.Certificate)
	if b == nil || len(rest) != 0 {
		t.Fatal("status.certificate is not exactly one PEM certificate")
	}
	inter, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if inter.CheckSignatureFrom(root) != nil || !inter.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) || !inter.IsCA {
		t.Fatal("intermediate not signed by the published root for the requested key")
	}

	createCSR(t, client, "inter-x", cluster.IntermediateSigner, "node-x", "node-x")
	eventually(t, "the denial", func() bool {
		return hasCondition(getCSR(t, client, "inter-x"), certv1.CertificateDenied, cluster.ReasonDenied)
	})
	if len(getCSR(t, client, "inter-x").Status.Certificate) > 0 {
		t.Fatal("a denied CSR was signed")
	}

	// Another signer's CSR is never touched.
	createCSR(t, client, "foreign", "example.com/other", "node-a", "node-a")

	jwtKey := createCSR(t, client, "jwt-a", cluster.JWTKeySigner, "node-a", "node-a")
	eventually(t, "the JWT key receipt", func() bool { return len(getCSR(t, client, "jwt-a").Status.Certificate) > 0 })
	keys := jwksKeys(t, client)
	kid, _ := cluster.KeyID(jwtKey.Public())
	if len(keys) != 1 || keys[0].KeyID != kid || keys[0].Node != "node-a" {
		t.Fatalf("JWKS %+v, want node-a's key %s", keys, kid)
	}
	if c := getCSR(t, client, "foreign"); len(c.Status.Conditions) != 0 {
		t.Fatalf("another signer's CSR was answered: %+v", c.Status.Conditions)
	}

	// The node goes: its keys go at once.
	if err := client.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deleted node's key to leave the JWKS", func() bool { return len(jwksKeys(t, client)) == 0 })
}

func TestUserSecretUsedAsIs(t *testing.T) {
	now := time.Now()
	user, err := issue.Root(td, now, 1000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(user.Key)
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.RootSecret, Namespace: "csi-agent", ResourceVersion: "1"},
		Type:       corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       rootca.EncodeCertificates([]*x509.Certificate{user.Cert}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		},
	}
	client := fake.NewClientset(sec)
	c := start(t, client)
	eventually(t, "the trust bundle", func() bool { return len(bundleRoots(t, client)) == 1 })
	if !bundleRoots(t, client)[0].Equal(user.Cert) {
		t.Fatal("published root is not the user's")
	}
	if err := c.Holder().Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	p, err := c.Holder().Current()
	if err != nil || !p.Cert.Equal(user.Cert) {
		t.Fatalf("signing root is not the user's (%v)", err)
	}
	time.Sleep(200 * time.Millisecond) // a few polls
	got, _ := client.CoreV1().Secrets("csi-agent").Get(context.Background(), cluster.RootSecret, metav1.GetOptions{})
	if got.ResourceVersion != "1" || len(got.Annotations) != 0 {
		t.Fatalf("the user's Secret was written: %+v", got.ObjectMeta)
	}
}

// A user's root that replaced the published one while no replica led is
// published by the next leader next to the old one, and signs only after
// the activation delay: agents and peers see it before anything it signed.
func TestUserRootChangedWithoutLeaderWaitsForActivation(t *testing.T) {
	now := time.Now()
	old, err := issue.Root(td, now, 1000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	user, err := issue.Root(td, now, 1000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(user.Key)
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.RootSecret, Namespace: "csi-agent"},
		Type:       corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       rootca.EncodeCertificates([]*x509.Certificate{user.Cert}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		},
	}
	// What the last leader published: the old root only.
	ctb := &certv1.ClusterTrustBundle{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.TrustBundleName(cluster.SVIDSigner, td), Labels: map[string]string{cluster.TrustDomainLabel: td.Name()}},
		Spec:       certv1.ClusterTrustBundleSpec{SignerName: cluster.SVIDSigner, TrustBundle: string(rootca.EncodeCertificates([]*x509.Certificate{old.Cert}))},
	}
	client := fake.NewClientset(sec, ctb, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	o := testOptions()
	o.RootActivationDelay = 2 * time.Second
	c := startWith(t, client, o)
	ctx := context.Background()

	eventually(t, "both roots published", func() bool { return len(bundleRoots(t, client)) == 2 })
	if err := c.Holder().Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var notYet *rootca.NotSigningError
	if _, err := c.Holder().Current(); !errors.As(err, &notYet) {
		t.Fatalf("Current right after publication: %v, want a NotSigningError", err)
	}
	asked := time.Now()
	createCSR(t, client, "inter-a", cluster.IntermediateSigner, "node-a", "node-a")
	eventually(t, "the intermediate", func() bool { return len(getCSR(t, client, "inter-a").Status.Certificate) > 0 })
	if signed := time.Now(); signed.Before(notYet.Until) {
		t.Fatalf("signed at %s, before the root's activation at %s (asked at %s)", signed, notYet.Until, asked)
	}
	b, _ := pem.Decode(getCSR(t, client, "inter-a").Status.Certificate)
	inter, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if inter.CheckSignatureFrom(user.Cert) != nil {
		t.Fatal("the intermediate is not signed by the user's root")
	}
}

// The root Secret is watched: a rotate annotation is acted on at once, not
// at the next poll.
func TestRotateAnnotationSeenAtOnce(t *testing.T) {
	client := fake.NewClientset()
	o := testOptions()
	o.RootPoll = time.Hour
	startWith(t, client, o)
	ctx := context.Background()
	eventually(t, "the trust bundle", func() bool { return len(bundleRoots(t, client)) == 1 })
	sec, err := client.CoreV1().Secrets("csi-agent").Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec.Annotations[rootca.AnnotationRotate] = "now"
	if _, err := client.CoreV1().Secrets("csi-agent").Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the next root published (RootPoll is an hour)", func() bool { return len(bundleRoots(t, client)) == 2 })
}

func TestFailoverKeepsTheRoot(t *testing.T) {
	client := fake.NewClientset()
	c1, err := New(client, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := c1.reconcileRoot(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	first, _ := c1.Holder().Current()
	c2 := start(t, client)
	eventually(t, "the new leader's root", func() bool { _, err := c2.Holder().Current(); return err == nil })
	second, _ := c2.Holder().Current()
	if !second.Cert.Equal(first.Cert) {
		t.Fatal("a new leader made a new root")
	}
	if roots := bundleRoots(t, client); len(roots) != 1 || !roots[0].Equal(first.Cert) {
		t.Fatal("trust bundle changed on failover")
	}
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Set(t time.Time) { c.mu.Lock(); defer c.mu.Unlock(); c.t = t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// The next root's delay counts from its publication, not its making: a
// slow (or failed, retried) bundle update must not shorten it.
func TestNextRootDelayCountsFromPublication(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{t: time.Now()}
	client := fake.NewClientset()
	const slow = 5 * time.Minute
	client.PrependReactor("update", "clustertrustbundles", func(k8stesting.Action) (bool, runtime.Object, error) {
		clock.Add(slow)
		return false, nil, nil
	})
	o := testOptions()
	o.Now = clock.Now
	c, err := New(client, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.reconcileRoot(ctx); err != nil {
		t.Fatal(err)
	}
	first, _ := c.Holder().Current()
	sec, _ := client.CoreV1().Secrets("csi-agent").Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	sec.Annotations[rootca.AnnotationRotate] = ""
	if _, err := client.CoreV1().Secrets("csi-agent").Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	asked := clock.Now()
	if err := c.reconcileRoot(ctx); err != nil {
		t.Fatal(err)
	}
	if len(bundleRoots(t, client)) != 2 {
		t.Fatal("next root not published")
	}
	s, _ := c.Holder().State()
	if want := asked.Add(slow).Add(o.RootActivationDelay); s.NextActivates.Before(want) {
		t.Fatalf("next root activates at %s, before publication + delay %s", s.NextActivates, want)
	}
	sec, _ = client.CoreV1().Secrets("csi-agent").Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	if _, asking := sec.Annotations[rootca.AnnotationRotate]; asking || sec.Data[rootca.KeyNextCert] == nil {
		t.Fatalf("secret after the rotation request: annotations %v", sec.Annotations)
	}
	// Just before the delay ends the old root still signs; after, the new one.
	clock.Set(s.NextActivates.Add(-time.Second))
	if err := c.reconcileRoot(ctx); err != nil {
		t.Fatal(err)
	}
	if cur, _ := c.Holder().Current(); !cur.Cert.Equal(first.Cert) {
		t.Fatal("next root signs before its delay after publication")
	}
	clock.Set(s.NextActivates)
	if err := c.reconcileRoot(ctx); err != nil {
		t.Fatal(err)
	}
	if cur, _ := c.Holder().Current(); cur.Cert.Equal(first.Cert) {
		t.Fatal("next root does not sign after its delay")
	}
	if len(bundleRoots(t, client)) != 2 {
		t.Fatal("old root not kept in the bundle")
	}
}

// A broken root Secret stops nothing but signing: once fixed, it is used.
func TestBrokenRootSecretRetried(t *testing.T) {
	ctx := context.Background()
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.RootSecret, Namespace: "csi-agent"},
		Type:       corev1.SecretTypeTLS,
		Data:       map[string][]byte{corev1.TLSCertKey: []byte("not a certificate"), corev1.TLSPrivateKeyKey: []byte("nor a key")},
	}
	client := fake.NewClientset(sec)
	c := start(t, client)
	time.Sleep(200 * time.Millisecond)
	if _, err := c.Holder().Current(); err == nil || len(bundleRoots(t, client)) != 0 {
		t.Fatal("a root was loaded or published from a broken Secret")
	}
	user, err := issue.Root(td, time.Now(), 1000*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(user.Key)
	sec.Data = map[string][]byte{
		corev1.TLSCertKey:       rootca.EncodeCertificates([]*x509.Certificate{user.Cert}),
		corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
	if _, err := client.CoreV1().Secrets("csi-agent").Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the fixed root", func() bool {
		roots := bundleRoots(t, client)
		return len(roots) == 1 && roots[0].Equal(user.Cert)
	})
}

// A CSR someone else approved is signed only if it passes the checks.
func TestApprovedElsewhereStillChecked(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}})
	for _, name := range []string{"ok", "bad"} {
		node := "node-a"
		if name == "bad" {
			node = "node-x"
		}
		csr, _ := csrWithKey(t, name, cluster.IntermediateSigner, td, node)
		csr.Spec.Username = "system:serviceaccount:csi-agent:csi-agent"
		csr.Spec.Extra = map[string]certv1.ExtraValue{cluster.NodeNameExtra: {node}}
		csr.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "AdminSaidSo"}}
		if _, err := client.CertificatesV1().CertificateSigningRequests().Create(ctx, csr, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	start(t, client)
	eventually(t, "the approved CSR signed", func() bool { return len(getCSR(t, client, "ok").Status.Certificate) > 0 })
	eventually(t, "the failing CSR marked Failed", func() bool {
		return hasCondition(getCSR(t, client, "bad"), certv1.CertificateFailed, cluster.ReasonDenied)
	})
	if len(getCSR(t, client, "bad").Status.Certificate) > 0 {
		t.Fatal("a CSR failing the checks was signed because someone approved it")
	}
}
