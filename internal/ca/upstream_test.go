package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Agents sharing an upstream CA form one trust domain: each accepts the
// other's X.509-SVIDs and JWT-SVIDs; an agent with another upstream does not.
func TestUpstreamSharedTrust(t *testing.T) {
	for _, kind := range upstreamKinds {
		t.Run(kind.name, func(t *testing.T) {
			fc := newFakeClock()
			up := writeUpstream(t, kind, fc.Now())
			a := newUpstream(t, up, fc)
			b := newUpstream(t, up, fc)
			stranger := newUpstream(t, writeUpstream(t, kind, fc.Now()), fc)

			if roots := a.Bundle().X509Authorities(); len(roots) != 1 || !roots[0].Equal(up.cert) {
				t.Fatalf("bundle X.509 authorities = %d, want exactly the upstream certificate", len(roots))
			}
			if !a.Bundle().Equal(b.Bundle()) {
				t.Error("agents with the same upstream publish different bundles")
			}

			sa, sb := mintX509(t, a, testID), mintX509(t, b, testID)
			if sa.Certificates[1].Equal(sb.Certificates[1]) {
				t.Error("agents share an intermediate; each should have its own")
			}
			now := fc.Now()
			for _, c := range []struct {
				name   string
				err    error
				wantOK bool
			}{
				{"a's SVID, b's bundle", verifyX509(sa, b.Bundle(), now), true},
				{"b's SVID, a's bundle", verifyX509(sb, a.Bundle(), now), true},
				{"a's SVID, stranger's bundle", verifyX509(sa, stranger.Bundle(), now), false},
				{"stranger's SVID, a's bundle", verifyX509(mintX509(t, stranger, testID), a.Bundle(), now), false},
				{"a's JWT, b's bundle", validateJWT(mintJWT(t, a, testID, "aud"), b.Bundle(), "aud"), true},
				{"b's JWT, a's bundle", validateJWT(mintJWT(t, b, testID, "aud"), a.Bundle(), "aud"), true},
				{"a's JWT, stranger's bundle", validateJWT(mintJWT(t, a, testID, "aud"), stranger.Bundle(), "aud"), false},
				{"stranger's JWT, a's bundle", validateJWT(mintJWT(t, stranger, testID, "aud"), a.Bundle(), "aud"), false},
			} {
				if (c.err == nil) != c.wantOK {
					t.Errorf("%s: err = %v, want ok=%v", c.name, c.err, c.wantOK)
				}
			}
		})
	}
}

func TestUpstreamClampsIntermediate(t *testing.T) {
	fc := newFakeClock()
	up := writeUpstream(t, upstreamKinds[0], fc.Now(), func(c *x509.Certificate) {
		c.NotAfter = fc.Now().Add(2 * time.Hour).Truncate(time.Second)
	})
	a := newUpstream(t, up, fc)
	s := mintX509(t, a, testID)
	if inter := s.Certificates[1]; !inter.NotAfter.Equal(up.cert.NotAfter) {
		t.Errorf("intermediate NotAfter = %s, want clamped to upstream %s", inter.NotAfter, up.cert.NotAfter)
	}

	// Past the upstream's expiry nothing can be issued: fail closed.
	fc.Step(3 * time.Hour)
	if s, err := a.MintX509SVID(context.Background(), testID, nil); err == nil {
		t.Fatalf("minted %s under an expired upstream CA", s.Certificates[0].NotAfter)
	}
}

func TestUpstreamErrors(t *testing.T) {
	fc := newFakeClock()
	now := fc.Now()
	ec := upstreamKinds[0]
	good := writeUpstream(t, ec, now)
	other := writeUpstream(t, ec, now)
	dir := t.TempDir()
	file := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	read := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	_, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	edDER, _ := x509.MarshalPKCS8PrivateKey(edPriv)
	smallRSA, _ := rsa.GenerateKey(rand.Reader, 1024)

	notCA := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.IsCA = false; c.KeyUsage = x509.KeyUsageDigitalSignature })
	pathZero := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.MaxPathLenZero = true })
	expired := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.NotAfter = now.Add(-time.Minute) })
	future := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.NotBefore = now.Add(time.Hour) })
	otherTD := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.URIs = []*url.URL{{Scheme: "spiffe", Host: "other.org"}} })
	withPath := writeUpstream(t, ec, now, func(c *x509.Certificate) {
		c.URIs = []*url.URL{spiffeid.RequireFromString("spiffe://example.org/ca").URL()}
	})

	tests := []struct {
		name               string
		certFile, keyFile  string
		wantFile, wantText string
	}{
		{"missing cert file", filepath.Join(dir, "nope.crt"), good.keyFile, "nope.crt", "no such file"},
		{"missing key file", good.certFile, filepath.Join(dir, "nope.key"), "nope.key", "no such file"},
		{"key does not match", good.certFile, other.keyFile, other.keyFile, "does not match"},
		{"key in cert file", good.keyFile, good.keyFile, good.keyFile, "want CERTIFICATE"},
		{"cert in key file", good.certFile, good.certFile, good.certFile, "want a private key"},
		{"empty cert file", file("empty.crt", nil), good.keyFile, "empty.crt", "no certificate found"},
		{"empty key file", good.certFile, file("empty.key", []byte("\n")), "empty.key", "no private key found"},
		{"garbage key", good.certFile, file("garbage.key", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("junk")})), "garbage.key", "parse ec private key"},
		{"two keys", good.certFile, file("two.key", append(read(good.keyFile), read(other.keyFile)...)), "two.key", "more than one private key"},
		{"encrypted key", good.certFile, file("enc.key", pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}})), "enc.key", "encrypted"},
		{"legacy encrypted key", good.certFile, file("enc2.key", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED"}, Bytes: []byte{1}})), "enc2.key", "encrypted"},
		{"ed25519 key", good.certFile, file("ed.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: edDER})), "ed.key", "unsupported private key type"},
		{"small RSA key", good.certFile, file("small.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(smallRSA)})), "small.key", "too small"},
		{"not a CA", notCA.certFile, notCA.keyFile, notCA.certFile, "not a CA"},
		{"path length zero", pathZero.certFile, pathZero.keyFile, pathZero.certFile, "path length 0"},
		{"expired", expired.certFile, expired.keyFile, expired.certFile, "expired at"},
		{"not yet valid", future.certFile, future.keyFile, future.certFile, "not valid before"},
		{"other trust domain", otherTD.certFile, otherTD.keyFile, otherTD.certFile, `trust domain "other.org"`},
		{"SPIFFE ID with path", withPath.certFile, withPath.keyFile, withPath.certFile, "must not have a path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newCA(context.Background(), Options{TrustDomain: testTD, UpstreamCertFile: tt.certFile, UpstreamKeyFile: tt.keyFile, Clock: fc})
			if err == nil {
				t.Fatal("New accepted a bad upstream CA")
			}
			if !strings.Contains(err.Error(), tt.wantFile) || !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q should name %s and contain %q", err, tt.wantFile, tt.wantText)
			}
		})
	}
}

func TestUpstreamKeyFormats(t *testing.T) {
	// openssl ecparam -genkey writes an EC PARAMETERS block first.
	fc := newFakeClock()
	up := writeUpstream(t, upstreamKinds[0], fc.Now())
	keyPEM, _ := os.ReadFile(up.keyFile)
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
	if err := os.WriteFile(up.keyFile, append(params, keyPEM...), 0o644); err != nil {
		t.Fatal(err)
	}
	newUpstream(t, up, fc)
}

func TestDeriveJWTKey(t *testing.T) {
	ec1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ec2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsa1, _ := rsa.GenerateKey(rand.Reader, 2048)
	other := spiffeid.RequireTrustDomainFromString("other.org")

	d := func(k crypto.Signer, td spiffeid.TrustDomain) *ecdsa.PrivateKey {
		t.Helper()
		key, err := deriveJWTKey(k, td)
		if err != nil {
			t.Fatal(err)
		}
		if key.Curve != elliptic.P256() {
			t.Fatal("derived key is not P-256")
		}
		return key
	}
	if !d(ec1, testTD).Equal(d(ec1, testTD)) || !d(rsa1, testTD).Equal(d(rsa1, testTD)) {
		t.Error("derivation is not deterministic")
	}
	// Parsing the same key from another encoding must not change the result.
	reparsed, err := x509.ParsePKCS1PrivateKey(x509.MarshalPKCS1PrivateKey(rsa1))
	if err != nil {
		t.Fatal(err)
	}
	if !d(reparsed, testTD).Equal(d(rsa1, testTD)) {
		t.Error("derivation depends on the key encoding")
	}
	if d(ec1, testTD).Equal(d(ec2, testTD)) {
		t.Error("different upstream keys derive the same JWT key")
	}
	if d(ec1, testTD).Equal(d(ec1, other)) {
		t.Error("trust domain does not separate derived keys")
	}
	if d(ec1, testTD).Equal(ec1) {
		t.Error("derived key equals the upstream key")
	}
}

// FuzzParsePrivateKeyPEM: the upstream key parser must never crash.
func FuzzParsePrivateKeyPEM(f *testing.F) {
	for _, kind := range upstreamKinds[:1] {
		k, _ := kind.newKey()
		typ, der, _ := kind.encode(k)
		f.Add(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	}
	f.Add([]byte("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"))
	f.Add([]byte("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"))
	f.Add([]byte("junk"))
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := parsePrivateKeyPEM(data)
		if err == nil && k == nil {
			t.Fatal("nil key without error")
		}
	})
}

// FuzzParseCertificatesPEM: the upstream certificate parser must never crash.
func FuzzParseCertificatesPEM(f *testing.F) {
	up := writeUpstream(f, upstreamKinds[0], time.Now())
	good, _ := os.ReadFile(up.certFile)
	f.Add(good)
	f.Add(append(good, good...))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := ParseCertificatesPEM(data)
		if err == nil && len(certs) == 0 {
			t.Fatal("no certificates without error")
		}
	})
}
