package podcert

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/csi-agent/csi-agent/attestor/field"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/rules"
)

var testTD = spiffeid.RequireTrustDomainFromString("example.org")

// testCA is a throwaway root that signs leaves directly.
type testCA struct {
	root *x509.Certificate
	key  crypto.Signer
	now  func() time.Time
	// extra makes SignSVID issue leaves this much longer than asked (a
	// broken signer).
	extra time.Duration
}

func newTestCA(t testing.TB, life time.Duration) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(life),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{testTD.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{root: root, key: key, now: time.Now}
}

func (ca *testCA) SignSVID(_ context.Context, pub crypto.PublicKey, id spiffeid.ID, dns []string, ttl time.Duration) ([]*x509.Certificate, error) {
	nb := ca.now().Truncate(time.Second)
	na := nb.Add(ttl + ca.extra)
	if na.After(ca.root.NotAfter) {
		na = ca.root.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: nb, NotAfter: na,
		URIs: []*url.URL{id.URL()}, DNSNames: dns,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.root, pub, ca.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf}, nil
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.root)
	return p
}

func stubCSR(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func p256(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// world is a consistent pod, node, service account and request.
type world struct {
	pod  *corev1.Pod
	node *corev1.Node
	sa   *corev1.ServiceAccount
	pcr  *certv1.PodCertificateRequest
}

func newWorld(t testing.TB, key crypto.Signer) world {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", UID: "node-uid"}}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "sa-uid"}}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: "shop", UID: "pod-uid", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			NodeName: "n1", ServiceAccountName: "web",
			Containers: []corev1.Container{{Name: "c", Image: "nginx"}},
			Volumes: []corev1.Volume{{Name: "svid", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{{PodCertificate: &corev1.PodCertificateProjection{
					SignerName: cluster.SVIDSigner, KeyType: "ECDSAP256", CredentialBundlePath: "svid.pem",
				}}},
			}}}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodPending},
	}
	pcr := &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "req-1", Namespace: "shop", Generation: 1},
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: cluster.SVIDSigner,
			PodName:    "web-0", PodUID: "pod-uid",
			ServiceAccountName: "web", ServiceAccountUID: "sa-uid",
			NodeName: "n1", NodeUID: "node-uid",
			MaxExpirationSeconds: ptr.To[int32](86400),
			StubPKCS10Request:    stubCSR(t, key),
		},
	}
	return world{pod: pod, node: node, sa: sa, pcr: pcr}
}

// testRules: service account "web" gets /ns/<ns>/sa/<sa> (hint "default")
// and, with label tier=gold, a second SVID hinted "gold"; "db" pods need a
// container field, which API pods never have.
func testRules(t testing.TB) *rules.Set {
	t.Helper()
	set, err := rules.Compile(testTD, []rules.SVID{
		{
			SPIFFEID: rules.DefaultSPIFFEID, Hint: "default", DNSNames: []string{"{" + field.K8sPodName + "}.svc"},
			Rules: []rules.Rule{{Match: map[string]string{field.K8sServiceAccount: "web"}}},
		},
		{
			SPIFFEID: "/gold/{" + field.K8sPodName + "}", Hint: "gold",
			Rules: []rules.Rule{{Match: map[string]string{field.PodLabel("tier"): "gold"}}},
		},
		{
			SPIFFEID: "/db",
			Rules:    []rules.Rule{{Match: map[string]string{field.K8sServiceAccount: "db", field.K8sContainerName: "postgres"}}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

func mustID(t testing.TB, path string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromPath(testTD, path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
