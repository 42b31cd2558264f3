package issue

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	td  = spiffeid.RequireTrustDomainFromString("example.org")
	now = time.Date(2026, 12, 1, 12, 0, 0, 500_000_000, time.UTC)
)

func key(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func root(t *testing.T) Parent {
	t.Helper()
	r, err := Root(td, now.Add(-time.Hour), 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestIntermediate(t *testing.T) {
	r := root(t)
	nodeID := spiffeid.RequireFromString("spiffe://example.org/csi-agent/node/node-a")
	k := key(t)
	inter, err := Intermediate(r, k.Public(), td, nodeID, now, 6*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case !inter.IsCA || !inter.BasicConstraintsValid:
		t.Error("not a CA")
	case inter.MaxPathLen != 0 || !inter.MaxPathLenZero:
		t.Errorf("MaxPathLen %d (zero %v), want 0 and set", inter.MaxPathLen, inter.MaxPathLenZero)
	case len(inter.PermittedURIDomains) != 1 || inter.PermittedURIDomains[0] != "example.org":
		t.Errorf("PermittedURIDomains %v, want [example.org]", inter.PermittedURIDomains)
	case len(inter.URIs) != 1 || inter.URIs[0].String() != nodeID.String():
		t.Errorf("URIs %v, want [%s]", inter.URIs, nodeID)
	case inter.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign:
		t.Errorf("KeyUsage %v", inter.KeyUsage)
	case inter.NotAfter.Sub(inter.NotBefore) != 6*time.Hour:
		t.Errorf("lifetime %s, want 6h", inter.NotAfter.Sub(inter.NotBefore))
	case !inter.PublicKey.(*ecdsa.PublicKey).Equal(k.Public()):
		t.Error("not the requested key")
	}
	if err := inter.CheckSignatureFrom(r.Cert); err != nil {
		t.Fatalf("not signed by the root: %v", err)
	}

	// What the node signs with it verifies up to the root; a second-level
	// CA or an ID of another trust domain does not (path length, name
	// constraint).
	ip := Parent{Cert: inter, Key: k}
	roots := x509.NewCertPool()
	roots.AddCert(r.Cert)
	verify := func(leaf *x509.Certificate, more ...*x509.Certificate) error {
		inters := x509.NewCertPool()
		inters.AddCert(inter)
		for _, c := range more {
			inters.AddCert(c)
		}
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: now.Add(time.Minute), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err
	}
	leaf, err := SVID(ip, key(t).Public(), spiffeid.RequireFromString("spiffe://example.org/ns/a/sa/b"), nil, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(leaf); err != nil {
		t.Fatalf("leaf of the trust domain does not verify: %v", err)
	}
	foreign, err := SVID(ip, key(t).Public(), spiffeid.RequireFromString("spiffe://evil.org/ns/a/sa/b"), nil, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(foreign); err == nil {
		t.Fatal("an ID of another trust domain verified through the node intermediate")
	}
	subKey := key(t)
	sub, err := Intermediate(ip, subKey.Public(), td, nodeID, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	under, err := SVID(Parent{Cert: sub, Key: subKey}, key(t).Public(), spiffeid.RequireFromString("spiffe://example.org/ns/a/sa/b"), nil, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(under, sub); err == nil {
		t.Fatal("a CA under the node intermediate verified (path length must be 0)")
	}
}

func TestLifetimeClampedToParent(t *testing.T) {
	r, err := Root(td, now.Add(-time.Hour), 3*time.Hour) // expires now+2h
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://example.org/csi-agent/node/n")
	c, err := Intermediate(r, key(t).Public(), td, id, now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !c.NotAfter.Equal(r.Cert.NotAfter) {
		t.Fatalf("NotAfter %s, want the root's %s", c.NotAfter, r.Cert.NotAfter)
	}
	if _, err := Intermediate(r, key(t).Public(), td, id, r.Cert.NotAfter, time.Hour); err == nil {
		t.Fatal("issued from an expired root")
	}
	if _, err := Receipt(r, key(t).Public(), id, now, 0); err == nil {
		t.Fatal("issued with a zero lifetime")
	}
}

func TestSVID(t *testing.T) {
	r := root(t)
	id := spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		pub   crypto.PublicKey
		usage x509.KeyUsage
	}{
		{"ecdsa", key(t).Public(), x509.KeyUsageDigitalSignature},
		{"rsa", rk.Public(), x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := SVID(r, tt.pub, id, []string{"web.default.svc"}, now, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case c.IsCA:
				t.Error("leaf is a CA")
			case c.KeyUsage != tt.usage:
				t.Errorf("KeyUsage %v, want %v", c.KeyUsage, tt.usage)
			case len(c.ExtKeyUsage) != 2 || c.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || c.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth:
				t.Errorf("ExtKeyUsage %v", c.ExtKeyUsage)
			case len(c.URIs) != 1 || c.URIs[0].String() != id.String() || len(c.DNSNames) != 1:
				t.Errorf("SANs %v %v", c.URIs, c.DNSNames)
			case c.NotAfter.Sub(c.NotBefore) > time.Hour || c.NotBefore.After(now):
				t.Errorf("validity %s..%s for now %s and 1h", c.NotBefore, c.NotAfter, now)
			case c.SerialNumber.BitLen() != 127:
				t.Errorf("serial of %d bits", c.SerialNumber.BitLen())
			}
		})
	}
	if _, err := SVID(r, key(t).Public(), td.ID(), nil, now, time.Hour); err == nil {
		t.Fatal("issued an SVID for the trust domain ID")
	}
}

func TestReceiptIsNotACA(t *testing.T) {
	c, err := Receipt(root(t), key(t).Public(), spiffeid.RequireFromString("spiffe://example.org/csi-agent/node/n"), now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if c.IsCA || c.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Fatalf("receipt IsCA %v KeyUsage %v", c.IsCA, c.KeyUsage)
	}
}

func TestRoot(t *testing.T) {
	r := root(t)
	if !r.Cert.IsCA || r.Cert.MaxPathLen != 1 || r.Cert.URIs[0].String() != "spiffe://example.org" {
		t.Fatalf("root IsCA %v MaxPathLen %d URIs %v", r.Cert.IsCA, r.Cert.MaxPathLen, r.Cert.URIs)
	}
	if err := r.Cert.CheckSignatureFrom(r.Cert); err != nil {
		t.Fatalf("not self-signed: %v", err)
	}
}
