package csrcheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func policy() Policy {
	return Policy{
		TrustDomain:          td,
		IntermediateSigner:   cluster.IntermediateSigner,
		JWTKeySigner:         cluster.JWTKeySigner,
		AgentServiceAccounts: []string{"csi-agent:csi-agent"},
		DefaultTTL:           6 * time.Hour,
		MaxTTL:               24 * time.Hour,
	}
}

func nodes(t *testing.T) NodeGetter {
	deleting := metav1.Now()
	objs := map[string]*corev1.Node{
		"node-a":    {ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		"node-b":    {ObjectMeta: metav1.ObjectMeta{Name: "node-b"}},
		"node-gone": {ObjectMeta: metav1.ObjectMeta{Name: "node-gone", DeletionTimestamp: &deleting}},
	}
	return func(name string) (*corev1.Node, error) {
		if name == "node-broken" {
			return nil, errors.New("cache unavailable")
		}
		if n, ok := objs[name]; ok {
			return n, nil
		}
		return nil, apierrors.NewNotFound(corev1.Resource("nodes"), name)
	}
}

type reqSpec struct {
	key    crypto.Signer
	uris   []string
	dns    []string
	ips    []net.IP
	emails []string
}

func csrPEM(t *testing.T, r reqSpec) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{DNSNames: r.dns, IPAddresses: r.ips, EmailAddresses: r.emails}
	for _, u := range r.uris {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, p)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, r.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ecKey(t *testing.T, c elliptic.Curve) crypto.Signer {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func rsaKey(t *testing.T, bits int) crypto.Signer {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

const nodeA = "spiffe://example.org/csi-agent/node/node-a"

func TestDecide(t *testing.T) {
	p256 := ecKey(t, elliptic.P256())
	p384 := ecKey(t, elliptic.P384())
	p521 := ecKey(t, elliptic.P521())
	rsa2048 := rsaKey(t, 2048)
	rsa1024 := rsaKey(t, 1024)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	good := csrPEM(t, reqSpec{key: p256, uris: []string{nodeA}})
	inter := []certv1.KeyUsage{certv1.UsageCertSign, certv1.UsageCRLSign}
	jwt := []certv1.KeyUsage{certv1.UsageDigitalSignature}
	secs := func(s int32) *int32 { return &s }

	type csrOpt func(*certv1.CertificateSigningRequestSpec)
	base := func(opts ...csrOpt) *certv1.CertificateSigningRequest {
		spec := certv1.CertificateSigningRequestSpec{
			SignerName: cluster.IntermediateSigner,
			Username:   "system:serviceaccount:csi-agent:csi-agent",
			Extra:      map[string]certv1.ExtraValue{cluster.NodeNameExtra: {"node-a"}},
			Request:    good,
			Usages:     inter,
		}
		for _, o := range opts {
			o(&spec)
		}
		return &certv1.CertificateSigningRequest{ObjectMeta: metav1.ObjectMeta{Name: "csr"}, Spec: spec}
	}
	request := func(r reqSpec) csrOpt {
		pem := csrPEM(t, r)
		return func(s *certv1.CertificateSigningRequestSpec) { s.Request = pem }
	}
	jwtKey := func(s *certv1.CertificateSigningRequestSpec) { s.SignerName, s.Usages = cluster.JWTKeySigner, jwt }

	tests := []struct {
		name    string
		csr     *certv1.CertificateSigningRequest
		reason  string // "" approves
		message string // part of the denial message
		kind    Kind
		ttl     time.Duration
	}{
		{name: "intermediate default TTL", csr: base(), kind: KindIntermediate, ttl: 6 * time.Hour},
		{name: "intermediate cert sign only", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Usages = inter[:1] }), kind: KindIntermediate, ttl: 6 * time.Hour},
		{name: "intermediate requested TTL", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.ExpirationSeconds = secs(3600) }), kind: KindIntermediate, ttl: time.Hour},
		{name: "lifetime clamped to the cap", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.ExpirationSeconds = secs(7 * 24 * 3600) }), kind: KindIntermediate, ttl: 24 * time.Hour},
		{name: "intermediate P-384", csr: base(request(reqSpec{key: p384, uris: []string{nodeA}})), kind: KindIntermediate, ttl: 6 * time.Hour},
		{name: "intermediate RSA 2048", csr: base(request(reqSpec{key: rsa2048, uris: []string{nodeA}})), kind: KindIntermediate, ttl: 6 * time.Hour},
		{name: "jwt key", csr: base(jwtKey), kind: KindJWTKey, ttl: 6 * time.Hour},

		{name: "unknown signer", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.SignerName = "example.com/other" }), reason: ReasonSigner, message: "example.com/other"},
		{name: "wrong service account", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Username = "system:serviceaccount:default:default" }), reason: ReasonServiceAccount, message: "controller.agentServiceAccounts"},
		{name: "a node, not a service account", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Username = "system:node:node-a" }), reason: ReasonServiceAccount},
		{name: "no node-name extra", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Extra = nil }), reason: ReasonNodeName, message: "pod-bound"},
		{name: "empty node-name extra", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Extra[cluster.NodeNameExtra] = []string{""} }), reason: ReasonNodeName},
		{name: "two node names", csr: base(func(s *certv1.CertificateSigningRequestSpec) {
			s.Extra[cluster.NodeNameExtra] = []string{"node-a", "node-b"}
		}), reason: ReasonNodeName, message: "2 values"},
		{name: "node missing", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Extra[cluster.NodeNameExtra] = []string{"node-x"} }), reason: ReasonNodeMissing, message: "node-x"},
		{name: "node deleting", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Extra[cluster.NodeNameExtra] = []string{"node-gone"} }), reason: ReasonNodeDeleting},
		{name: "SAN names another node", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Extra[cluster.NodeNameExtra] = []string{"node-b"} }), reason: ReasonSAN, message: "may only ask for spiffe://example.org/csi-agent/node/node-b"},
		{name: "SAN in another trust domain", csr: base(request(reqSpec{key: p256, uris: []string{"spiffe://other.org/csi-agent/node/node-a"}})), reason: ReasonSAN},
		{name: "SAN a workload ID", csr: base(request(reqSpec{key: p256, uris: []string{"spiffe://example.org/ns/default/sa/default"}})), reason: ReasonSAN},
		{name: "no SAN", csr: base(request(reqSpec{key: p256})), reason: ReasonSAN},
		{name: "two URI SANs", csr: base(request(reqSpec{key: p256, uris: []string{nodeA, "spiffe://example.org/x"}})), reason: ReasonSAN},
		{name: "extra DNS SAN", csr: base(request(reqSpec{key: p256, uris: []string{nodeA}, dns: []string{"node-a"}})), reason: ReasonSAN, message: "1 DNS"},
		{name: "extra IP SAN", csr: base(request(reqSpec{key: p256, uris: []string{nodeA}, ips: []net.IP{net.IPv4(10, 0, 0, 1)}})), reason: ReasonSAN},
		{name: "extra email SAN", csr: base(request(reqSpec{key: p256, uris: []string{nodeA}, emails: []string{"a@example.org"}})), reason: ReasonSAN},
		{name: "intermediate without cert sign", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Usages = []certv1.KeyUsage{certv1.UsageCRLSign} }), reason: ReasonUsages, message: "missing"},
		{name: "intermediate with server auth", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Usages = append(inter, certv1.UsageServerAuth) }), reason: ReasonUsages, message: "server auth"},
		{name: "intermediate with digital signature", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Usages = append(inter, certv1.UsageDigitalSignature) }), reason: ReasonUsages},
		{name: "jwt key with cert sign", csr: base(jwtKey, func(s *certv1.CertificateSigningRequestSpec) { s.Usages = inter }), reason: ReasonUsages},
		{name: "jwt key without usages", csr: base(jwtKey, func(s *certv1.CertificateSigningRequestSpec) { s.Usages = nil }), reason: ReasonUsages},
		{name: "intermediate P-521", csr: base(request(reqSpec{key: p521, uris: []string{nodeA}})), reason: ReasonKeyType, message: "P-521"},
		{name: "intermediate RSA 1024", csr: base(request(reqSpec{key: rsa1024, uris: []string{nodeA}})), reason: ReasonKeyType, message: "1024"},
		{name: "intermediate Ed25519", csr: base(request(reqSpec{key: ed, uris: []string{nodeA}})), reason: ReasonKeyType},
		{name: "jwt key P-384", csr: base(jwtKey, request(reqSpec{key: p384, uris: []string{nodeA}})), reason: ReasonKeyType, message: "ECDSA P-256"},
		{name: "jwt key RSA", csr: base(jwtKey, request(reqSpec{key: rsa2048, uris: []string{nodeA}})), reason: ReasonKeyType},
		{name: "request not PEM", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Request = []byte("hello") }), reason: ReasonRequest},
		{name: "request wrong PEM type", csr: base(func(s *certv1.CertificateSigningRequestSpec) {
			s.Request = []byte(strings.Replace(string(good), "CERTIFICATE REQUEST", "CERTIFICATE", -1))
		}), reason: ReasonRequest},
		{name: "request with trailing data", csr: base(func(s *certv1.CertificateSigningRequestSpec) { s.Request = append(append([]byte{}, good...), good...) }), reason: ReasonRequest},
		{name: "request with a bad signature", csr: base(func(s *certv1.CertificateSigningRequestSpec) {
			b, _ := pem.Decode(good)
			der := append([]byte{}, b.Bytes...)
			der[len(der)-3] ^= 0xff
			s.Request = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
		}), reason: ReasonRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Decide(tt.csr, nodes(t), policy())
			if err != nil {
				t.Fatalf("Decide: %v", err)
			}
			if tt.reason == "" {
				if !d.Approve {
					t.Fatalf("denied (%s: %s), want approved", d.Reason, d.Message)
				}
				if d.Kind != tt.kind || d.TTL != tt.ttl || d.Node != "node-a" || d.ID.String() != nodeA || d.Public == nil {
					t.Fatalf("approved %+v, want kind %v ttl %s for node-a", d, tt.kind, tt.ttl)
				}
				return
			}
			if d.Approve {
				t.Fatalf("approved, want denied for %s", tt.reason)
			}
			if d.Reason != tt.reason || !strings.Contains(d.Message, tt.message) {
				t.Fatalf("denied %s: %q, want %s containing %q", d.Reason, d.Message, tt.reason, tt.message)
			}
		})
	}
}

func TestDecideLookupErrorIsRetried(t *testing.T) {
	csr := &certv1.CertificateSigningRequest{Spec: certv1.CertificateSigningRequestSpec{
		SignerName: cluster.IntermediateSigner,
		Username:   "system:serviceaccount:csi-agent:csi-agent",
		Extra:      map[string]certv1.ExtraValue{cluster.NodeNameExtra: {"node-broken"}},
	}}
	if d, err := Decide(csr, nodes(t), policy()); err == nil {
		t.Fatalf("Decide = %+v, nil; want an error to retry on, not a decision", d)
	}
}

func FuzzParseRequest(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(nodeA)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, k)
	good := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	f.Add(good)
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte{})
	f.Add(append(append([]byte{}, good...), "junk"...))
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := ParseRequest(data)
		if err != nil {
			return
		}
		// Whatever parses was signed by the key it carries.
		if req.CheckSignature() != nil || req.PublicKey == nil {
			t.Fatalf("ParseRequest accepted a request whose signature does not verify")
		}
	})
}
