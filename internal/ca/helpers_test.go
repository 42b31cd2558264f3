package ca

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
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	clocktesting "k8s.io/utils/clock/testing"
)

var (
	testTD = spiffeid.RequireTrustDomainFromString("example.org")
	testID = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
)

// newFakeClock starts at the real time: go-spiffe's JWT validation reads the
// real clock, so tokens must be minted close to it.
func newFakeClock() *clocktesting.FakeClock {
	return clocktesting.NewFakeClock(time.Now())
}

func newSelfManaged(t testing.TB, dir string, fc *clocktesting.FakeClock, mod func(*Options)) *Authority {
	t.Helper()
	opts := Options{TrustDomain: testTD, StateDir: dir, Clock: fc}
	if mod != nil {
		mod(&opts)
	}
	a, err := newCA(context.Background(), opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return a
}

// runAuthority runs a.Run until the test ends.
func runAuthority(t *testing.T, a *Authority) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func waitForWaiters(t *testing.T, fc *clocktesting.FakeClock) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !fc.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for a timer on the fake clock")
		}
		time.Sleep(time.Millisecond)
	}
}

func mintX509(t testing.TB, a *Authority, id spiffeid.ID, dns ...string) *x509svid.SVID {
	t.Helper()
	svid, err := a.MintX509SVID(context.Background(), id, dns)
	if err != nil {
		t.Fatalf("MintX509SVID(%s): %v", id, err)
	}
	return svid
}

// verifyX509 checks an SVID the way a relying party does: go-spiffe parsing
// of the raw chain and key, then chain verification against bundle at now.
func verifyX509(svid *x509svid.SVID, bundle *spiffebundle.Bundle, now time.Time) error {
	certsDER, keyDER, err := svid.MarshalRaw()
	if err != nil {
		return err
	}
	if _, err := x509svid.ParseRaw(certsDER, keyDER); err != nil {
		return err
	}
	_, _, err = x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(now))
	return err
}

func mintJWT(t testing.TB, a *Authority, id spiffeid.ID, aud ...string) string {
	t.Helper()
	token, _, err := a.MintJWTSVID(context.Background(), id, aud)
	if err != nil {
		t.Fatalf("MintJWTSVID(%s): %v", id, err)
	}
	return token
}

func validateJWT(token string, bundle *spiffebundle.Bundle, aud ...string) error {
	_, err := jwtsvid.ParseAndValidate(token, bundle, aud)
	return err
}

type upstreamKind struct {
	name   string
	newKey func() (crypto.Signer, error)
	// encode returns the PEM block type and DER of the key.
	encode func(crypto.Signer) (string, []byte, error)
}

var upstreamKinds = []upstreamKind{
	{"ec-sec1", genEC, func(k crypto.Signer) (string, []byte, error) {
		der, err := x509.MarshalECPrivateKey(k.(*ecdsa.PrivateKey))
		return "EC PRIVATE KEY", der, err
	}},
	{"ec-p384-pkcs8", func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P384(), rand.Reader) }, encodePKCS8},
	{"rsa-pkcs1", genRSA, func(k crypto.Signer) (string, []byte, error) {
		return "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(k.(*rsa.PrivateKey)), nil
	}},
	{"rsa-pkcs8", genRSA, encodePKCS8},
}

func genEC() (crypto.Signer, error)  { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }
func genRSA() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) }

func encodePKCS8(k crypto.Signer) (string, []byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	return "PRIVATE KEY", der, err
}

// upstreamCA describes a test upstream CA written to files.
type upstreamCA struct {
	certFile, keyFile string
	cert              *x509.Certificate
	key               crypto.Signer
}

type upstreamTmpl func(*x509.Certificate)

// writeUpstream creates an upstream CA of the given kind in a new directory.
func writeUpstream(t testing.TB, kind upstreamKind, now time.Time, mods ...upstreamTmpl) upstreamCA {
	t.Helper()
	key, err := kind.newKey()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		Subject:               pkix.Name{CommonName: "test upstream " + kind.name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{testTD.ID().URL()},
	}
	for _, m := range mods {
		m(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	typ, keyDER, err := kind.encode(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	u := upstreamCA{
		certFile: filepath.Join(dir, "tls.crt"),
		keyFile:  filepath.Join(dir, "tls.key"),
		cert:     cert,
		key:      key,
	}
	writeFile(t, u.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	// Secrets are mounted 0644 by default: upstream files must load anyway.
	writeFile(t, u.keyFile, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: keyDER}))
	return u
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func newUpstream(t testing.TB, u upstreamCA, fc *clocktesting.FakeClock) *Authority {
	t.Helper()
	a, err := newCA(context.Background(), Options{
		TrustDomain: testTD, UpstreamCertFile: u.certFile, UpstreamKeyFile: u.keyFile, Clock: fc,
	})
	if err != nil {
		t.Fatalf("New (upstream): %v", err)
	}
	return a
}

// newCA fills the lifetimes internal/config would, then calls New.
func newCA(ctx context.Context, opts Options) (*Authority, error) {
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{
		{&opts.X509SVIDTTL, time.Hour},
		{&opts.JWTSVIDTTL, 5 * time.Minute},
		{&opts.IntermediateTTL, 24 * time.Hour},
	} {
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	return New(ctx, opts)
}
