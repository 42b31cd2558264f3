package cluster

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	certsv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// needAgents is the first line of every case that needs the running cluster.
func needAgents(t *testing.T) *env {
	t.Helper()
	needCluster(t)
	if suite.envErr != nil {
		t.Fatalf("cluster mode did not come up: %v", suite.envErr)
	}
	return suite.env
}

func timeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// fetchX509 opens a new connection to the agent and returns its SVID and
// the bundle of the trust domain it serves.
func fetchX509(ctx context.Context, t *testing.T, a *agent) (*x509svid.SVID, *x509bundle.Bundle) {
	t.Helper()
	xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.Addr()))
	if err != nil {
		t.Fatalf("FetchX509Context on %s: %v", a.node, err)
	}
	b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatalf("%s serves no bundle for %s: %v", a.node, td, err)
	}
	return xc.DefaultSVID(), b
}

// fetchJWT fetches a JWT-SVID from the agent, waiting while it answers
// Unavailable: an agent is ready on its intermediate, its JWT key may
// still be on its way into the JWKS.
func fetchJWT(ctx context.Context, t *testing.T, a *agent, audience string) *jwtsvid.SVID {
	t.Helper()
	var svid *jwtsvid.SVID
	var err error
	_ = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		svid, err = workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience}, workloadapi.WithAddr(a.Addr()))
		return err == nil || status.Code(err) != codes.Unavailable, nil
	})
	if err != nil {
		t.Fatalf("FetchJWTSVID on %s: %v", a.node, err)
	}
	return svid
}

// intermediate is the node CA in an X.509-SVID's chain (leaf, intermediate).
func intermediate(t *testing.T, s *x509svid.SVID) *x509.Certificate {
	t.Helper()
	if len(s.Certificates) != 2 {
		t.Fatalf("chain of %s has %d certificates, want leaf and node intermediate", s.ID, len(s.Certificates))
	}
	return s.Certificates[1]
}

// trustBundle returns the roots in the signer-linked ClusterTrustBundle.
func trustBundle(ctx context.Context, cs kubernetes.Interface) ([]*x509.Certificate, string, error) {
	ctb, err := cs.CertificatesV1().ClusterTrustBundles().Get(ctx, cluster.TrustBundleName(cluster.SVIDSigner, td), metav1.GetOptions{})
	if err != nil {
		return nil, "", err
	}
	certs, err := parsePEMCerts([]byte(ctb.Spec.TrustBundle))
	return certs, ctb.Spec.TrustBundle, err
}

func parsePEMCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
}

// jwks returns the keys in the JWKS ConfigMap.
func jwks(ctx context.Context, cs kubernetes.Interface) ([]cluster.JWTKey, error) {
	cm, err := cs.CoreV1().ConfigMaps(namespace).Get(ctx, cluster.JWKSConfigMap, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return cluster.ParseJWKS([]byte(cm.Data[cluster.JWKSKey]))
}

func keysOf(keys []cluster.JWTKey, node string) []string {
	var out []string
	for _, k := range keys {
		if k.Node == node {
			out = append(out, k.KeyID)
		}
	}
	return out
}

// leader is the holder of the controller's lease.
func leader(ctx context.Context, cs kubernetes.Interface) (string, error) {
	l, err := cs.CoordinationV1().Leases(namespace).Get(ctx, cluster.Lease, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if l.Spec.HolderIdentity == nil {
		return "", nil
	}
	return *l.Spec.HolderIdentity, nil
}

func clientFor(t *testing.T, kubeconfig string) kubernetes.Interface {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// csrSpec is a CertificateSigningRequest as a node agent (or an impostor)
// would make it.
type csrSpec struct {
	signer string
	uris   []string
	dns    []string
	usages []certsv1.KeyUsage
	key    string // "p256" (default) or "rsa1024"
}

func (s csrSpec) pkcs10() ([]byte, crypto.Signer, error) {
	var key crypto.Signer
	var err error
	switch s.key {
	case "", "p256":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "rsa1024":
		key, err = rsa.GenerateKey(rand.Reader, 1024)
	default:
		return nil, nil, fmt.Errorf("unknown key %q", s.key)
	}
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: "cluster-test"}, DNSNames: s.dns}
	for _, u := range s.uris {
		pu, err := url.Parse(u)
		if err != nil {
			return nil, nil, err
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), key, nil
}

// submitCSR creates the CSR with cs (so as its user) and waits until the
// controller decided: it returns the CSR with its Approved or Denied
// condition (and, when approved, its certificate).
func submitCSR(ctx context.Context, t *testing.T, cs kubernetes.Interface, s csrSpec) *certsv1.CertificateSigningRequest {
	t.Helper()
	req, _, err := s.pkcs10()
	if err != nil {
		t.Fatal(err)
	}
	exp := int32(600)
	csr, err := cs.CertificatesV1().CertificateSigningRequests().Create(ctx, &certsv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "cluster-test-"},
		Spec:       certsv1.CertificateSigningRequestSpec{Request: req, SignerName: s.signer, Usages: s.usages, ExpirationSeconds: &exp},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create CSR: %v", err)
	}
	t.Cleanup(func() {
		_ = suite.cp.Client.CertificatesV1().CertificateSigningRequests().Delete(context.Background(), csr.Name, metav1.DeleteOptions{})
	})
	var got *certsv1.CertificateSigningRequest
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		c, err := suite.cp.Client.CertificatesV1().CertificateSigningRequests().Get(ctx, csr.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		got = c
		if condition(c, certsv1.CertificateDenied) != nil || condition(c, certsv1.CertificateFailed) != nil {
			return true, nil
		}
		return condition(c, certsv1.CertificateApproved) != nil && len(c.Status.Certificate) > 0, nil
	})
	if err != nil {
		t.Fatalf("CSR %s: no decision within 30s (conditions %+v)", csr.Name, got.Status.Conditions)
	}
	return got
}

func condition(c *certsv1.CertificateSigningRequest, typ certsv1.RequestConditionType) *certsv1.CertificateSigningRequestCondition {
	for i := range c.Status.Conditions {
		if c.Status.Conditions[i].Type == typ && c.Status.Conditions[i].Status == corev1.ConditionTrue {
			return &c.Status.Conditions[i]
		}
	}
	return nil
}

func nodeURI(t *testing.T, node string) string {
	t.Helper()
	id, err := cluster.NodeID(td, node)
	if err != nil {
		t.Fatal(err)
	}
	return id.String()
}

// verifiesAgainst checks an X.509-SVID's chain against a bundle.
func verifiesAgainst(s *x509svid.SVID, b *x509bundle.Bundle) error {
	id, _, err := x509svid.Verify(s.Certificates, b)
	if err != nil {
		return err
	}
	if id != s.ID {
		return fmt.Errorf("verified as %s, SVID says %s", id, s.ID)
	}
	return nil
}

// signedBy reports which of roots signed cert, or -1.
func signedBy(cert *x509.Certificate, roots []*x509.Certificate) int {
	for i, r := range roots {
		if cert.CheckSignatureFrom(r) == nil {
			return i
		}
	}
	return -1
}

func wantID(t *testing.T) spiffeid.ID {
	t.Helper()
	return spiffeid.RequireFromPath(td, "/cluster-test/uid/0")
}
