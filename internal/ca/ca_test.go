package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
)

func extension(c *x509.Certificate, oid asn1.ObjectIdentifier) (critical, ok bool) {
	for _, e := range c.Extensions {
		if e.Id.Equal(oid) {
			return e.Critical, true
		}
	}
	return false, false
}

func TestMintX509SVIDLeafProperties(t *testing.T) {
	fc := newFakeClock()
	a := newSelfManaged(t, t.TempDir(), fc, nil)
	now := fc.Now()

	tests := []struct {
		name    string
		id      spiffeid.ID
		dns     []string
		wantDNS []string
	}{
		{name: "no DNS", id: testID},
		{name: "DNS names", id: testID, dns: []string{"web.default.svc", "*.example.org", "Web.Default.Svc."}, wantDNS: []string{"web.default.svc", "*.example.org"}},
		{name: "long path", id: spiffeid.RequireFromString("spiffe://example.org/" + strings.Repeat("a/", 500) + "b")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svid := mintX509(t, a, tt.id, tt.dns...)
			if err := verifyX509(svid, a.Bundle(), now); err != nil {
				t.Fatalf("SVID does not verify against the bundle: %v", err)
			}
			if svid.ID != tt.id {
				t.Errorf("ID = %s, want %s", svid.ID, tt.id)
			}
			if len(svid.Certificates) != 2 {
				t.Fatalf("chain has %d certificates, want leaf + intermediate", len(svid.Certificates))
			}
			leaf, inter := svid.Certificates[0], svid.Certificates[1]

			// Leaf, per the X.509-SVID rules.
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != tt.id.String() {
				t.Errorf("leaf URI SANs = %v, want exactly [%s]", leaf.URIs, tt.id)
			}
			if crit, _ := extension(leaf, oidSubjectAltName); len(leaf.Subject.Names) == 0 && !crit {
				t.Error("empty subject but SAN extension not critical")
			}
			if !leaf.BasicConstraintsValid || leaf.IsCA {
				t.Errorf("leaf basic constraints: valid=%v cA=%v, want valid, cA=false", leaf.BasicConstraintsValid, leaf.IsCA)
			}
			if _, ok := extension(leaf, oidBasicConstraints); !ok {
				t.Error("leaf has no basic constraints extension")
			}
			if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
				t.Errorf("leaf key usage = %b, want digitalSignature only", leaf.KeyUsage)
			}
			if crit, ok := extension(leaf, oidKeyUsage); !ok || !crit {
				t.Errorf("key usage extension present=%v critical=%v, want present and critical", ok, crit)
			}
			if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
				t.Errorf("ext key usage = %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
			}
			if strings.Join(leaf.DNSNames, ",") != strings.Join(tt.wantDNS, ",") {
				t.Errorf("DNS names = %v, want %v", leaf.DNSNames, tt.wantDNS)
			}
			if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() < 120 {
				t.Errorf("serial %s is not a positive ~128-bit random number", leaf.SerialNumber)
			}
			if leaf.NotBefore.After(now) || now.Sub(leaf.NotBefore) > time.Minute {
				t.Errorf("NotBefore %s should be slightly before now %s", leaf.NotBefore, now)
			}
			if want := now.Add(time.Hour); leaf.NotAfter.After(want) || want.Sub(leaf.NotAfter) > time.Second {
				t.Errorf("NotAfter = %s, want %s (default 1h TTL)", leaf.NotAfter, want)
			}
			if leaf.NotAfter.After(inter.NotAfter) {
				t.Errorf("leaf outlives its intermediate: %s > %s", leaf.NotAfter, inter.NotAfter)
			}
			key, ok := svid.PrivateKey.(*ecdsa.PrivateKey)
			if !ok || key.Curve != elliptic.P256() || !key.PublicKey.Equal(leaf.PublicKey) {
				t.Errorf("private key %T does not match the leaf or is not P-256", svid.PrivateKey)
			}

			// Signing intermediate.
			if err := leaf.CheckSignatureFrom(inter); err != nil {
				t.Errorf("leaf not signed by Certificates[1]: %v", err)
			}
			if !inter.IsCA || inter.MaxPathLen != 0 || !inter.MaxPathLenZero || inter.KeyUsage&x509.KeyUsageCertSign == 0 {
				t.Errorf("intermediate: cA=%v pathlen=%d zero=%v ku=%b, want CA with pathlen 0 and keyCertSign",
					inter.IsCA, inter.MaxPathLen, inter.MaxPathLenZero, inter.KeyUsage)
			}
			if len(inter.URIs) != 1 || inter.URIs[0].String() != "spiffe://example.org" {
				t.Errorf("intermediate URIs = %v, want the trust domain ID only", inter.URIs)
			}
			roots := a.Bundle().X509Authorities()
			if len(roots) != 1 || inter.CheckSignatureFrom(roots[0]) != nil {
				t.Fatalf("intermediate not signed by the single bundle root")
			}
			if inter.NotAfter.After(roots[0].NotAfter) {
				t.Errorf("intermediate outlives the root")
			}
		})
	}
}

func TestMintX509SVIDSerialsAndKeysUnique(t *testing.T) {
	a := newSelfManaged(t, t.TempDir(), newFakeClock(), nil)
	s1, s2 := mintX509(t, a, testID), mintX509(t, a, testID)
	if s1.Certificates[0].SerialNumber.Cmp(s2.Certificates[0].SerialNumber) == 0 {
		t.Error("two leaves share a serial number")
	}
	if s1.PrivateKey.(*ecdsa.PrivateKey).Equal(s2.PrivateKey) {
		t.Error("two leaves share a private key")
	}
}

func TestMintX509SVIDRejects(t *testing.T) {
	a := newSelfManaged(t, t.TempDir(), newFakeClock(), nil)
	tests := []struct {
		name string
		id   spiffeid.ID
		dns  []string
		want string
	}{
		{"zero ID", spiffeid.ID{}, nil, "empty SPIFFE ID"},
		{"other trust domain", spiffeid.RequireFromString("spiffe://evil.org/web"), nil, "not in trust domain"},
		{"trust domain ID", testTD.ID(), nil, "has no path"},
		{"empty DNS name", testID, []string{""}, "invalid DNS name"},
		{"DNS with space", testID, []string{"a b"}, "not allowed"},
		{"DNS with NUL", testID, []string{"a\x00.example.org"}, "not allowed"},
		{"inner wildcard", testID, []string{"a.*.example.org"}, "not allowed"},
		{"bare wildcard", testID, []string{"*"}, "not allowed"},
		{"long label", testID, []string{strings.Repeat("a", 64) + ".org"}, "bad label length"},
		{"long name", testID, []string{strings.Repeat("a.", 127) + "org"}, "length must be"},
		{"leading hyphen", testID, []string{"-a.org"}, "starts or ends"},
		{"empty label", testID, []string{"a..org"}, "bad label length"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svid, err := a.MintX509SVID(context.Background(), tt.id, tt.dns)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("MintX509SVID = %v, %v; want error containing %q", svid, err, tt.want)
			}
		})
	}
	t.Run("canceled context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := a.MintX509SVID(ctx, testID, nil); err == nil {
			t.Fatal("minted with a canceled context")
		}
	})
}

func TestMintJWTSVID(t *testing.T) {
	fc := newFakeClock()
	a := newSelfManaged(t, t.TempDir(), fc, func(o *Options) { o.JWTSVIDTTL = 3 * time.Minute })
	now := fc.Now()

	tests := []struct {
		name string
		aud  []string
	}{
		{"one audience", []string{"api"}},
		{"two audiences", []string{"api", "spiffe://example.org/db"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			token, exp, err := a.MintJWTSVID(context.Background(), testID, tt.aud)
			if err != nil {
				t.Fatal(err)
			}
			for _, aud := range tt.aud {
				if err := validateJWT(token, a.Bundle(), aud); err != nil {
					t.Errorf("ParseAndValidate(aud=%s): %v", aud, err)
				}
			}
			if err := validateJWT(token, a.Bundle(), "someone-else"); err == nil {
				t.Error("token validated for an audience it was not issued for")
			}

			// Header: exactly alg, kid, typ.
			var hdr map[string]any
			raw, err := base64.RawURLEncoding.DecodeString(strings.SplitN(token, ".", 2)[0])
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(raw, &hdr); err != nil {
				t.Fatal(err)
			}
			if len(hdr) != 3 || hdr["alg"] != "ES256" || hdr["typ"] != "JWT" || hdr["kid"] == "" {
				t.Errorf("header = %v, want exactly alg ES256, kid, typ JWT", hdr)
			}
			if _, ok := a.Bundle().FindJWTAuthority(hdr["kid"].(string)); !ok {
				t.Errorf("kid %v not in the bundle", hdr["kid"])
			}

			tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
			if err != nil {
				t.Fatal(err)
			}
			var claims jwt.Claims
			if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
				t.Fatal(err)
			}
			if claims.Subject != testID.String() {
				t.Errorf("sub = %q", claims.Subject)
			}
			if strings.Join(claims.Audience, ",") != strings.Join(tt.aud, ",") {
				t.Errorf("aud = %v, want %v", claims.Audience, tt.aud)
			}
			if claims.ID == "" || claims.IssuedAt == nil || claims.Expiry == nil {
				t.Errorf("missing jti/iat/exp: %+v", claims)
			}
			if got := claims.Expiry.Time(); !got.Equal(exp) || got.Sub(now) > 3*time.Minute || now.Add(3*time.Minute).Sub(got) > time.Second {
				t.Errorf("exp = %s (returned %s), want now+3m = %s", got, exp, now.Add(3*time.Minute))
			}
		})
	}

	t.Run("unique jti", func(t *testing.T) {
		ids := map[string]bool{}
		for range 3 {
			tok, err := jwt.ParseSigned(mintJWT(t, a, testID, "x"), []jose.SignatureAlgorithm{jose.ES256})
			if err != nil {
				t.Fatal(err)
			}
			var c jwt.Claims
			_ = tok.UnsafeClaimsWithoutVerification(&c)
			if ids[c.ID] {
				t.Fatalf("jti %q repeated", c.ID)
			}
			ids[c.ID] = true
		}
	})

	t.Run("rejects", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			id   spiffeid.ID
			aud  []string
		}{
			{"no audience", testID, nil},
			{"empty audience", testID, []string{"a", ""}},
			{"invalid UTF-8 audience", testID, []string{"\xff"}},
			{"foreign ID", spiffeid.RequireFromString("spiffe://evil.org/x"), []string{"a"}},
			{"zero ID", spiffeid.ID{}, []string{"a"}},
		} {
			if tok, _, err := a.MintJWTSVID(context.Background(), tc.id, tc.aud); err == nil {
				t.Errorf("%s: minted %q", tc.name, tok)
			}
		}
	})

	t.Run("other authority's bundle rejects", func(t *testing.T) {
		other := newSelfManaged(t, t.TempDir(), fc, nil)
		if err := validateJWT(mintJWT(t, a, testID, "x"), other.Bundle(), "x"); err == nil {
			t.Error("JWT validated against an unrelated trust anchor")
		}
	})
}

func TestBundleContents(t *testing.T) {
	a := newSelfManaged(t, t.TempDir(), newFakeClock(), nil)
	b := a.Bundle()
	if b.TrustDomain() != testTD {
		t.Errorf("bundle trust domain = %s", b.TrustDomain())
	}
	if n := len(b.X509Authorities()); n != 1 {
		t.Errorf("%d X.509 authorities, want 1", n)
	}
	jwks := b.JWTAuthorities()
	if len(jwks) != 1 {
		t.Fatalf("%d JWT authorities, want 1", len(jwks))
	}
	for kid, pub := range jwks {
		want, _ := keyID(pub.(*ecdsa.PublicKey))
		if kid != want || len(kid) != 22 {
			t.Errorf("kid %q, want %q (22 chars)", kid, want)
		}
	}
	// A caller mutating its copy must not change ours.
	b.RemoveX509Authority(b.X509Authorities()[0])
	if len(a.Bundle().X509Authorities()) != 1 {
		t.Error("Bundle() returned shared mutable state")
	}
	// The JWKS form carries use markers that go-spiffe clients rely on.
	doc, err := a.Bundle().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), `"use":"x509-svid"`) || !strings.Contains(string(doc), `"use":"jwt-svid"`) {
		t.Errorf("bundle JWKS lacks use markers: %s", doc)
	}
}

func TestOptionsValidation(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"no trust domain", Options{StateDir: dir}, "trust domain is required"},
		{"no state dir", Options{TrustDomain: testTD}, "state directory is required"},
		{"only upstream cert", Options{TrustDomain: testTD, UpstreamCertFile: "/x.crt"}, "both a certificate file and a key file"},
		{"only upstream key", Options{TrustDomain: testTD, UpstreamKeyFile: "/x.key"}, "both a certificate file and a key file"},
		{"negative TTL", Options{TrustDomain: testTD, StateDir: dir, X509SVIDTTL: -time.Second}, "must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newCA(context.Background(), tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, want error containing %q", err, tt.want)
			}
		})
	}
	t.Run("no defaults", func(t *testing.T) {
		// internal/config owns the defaults; a zero lifetime is a caller's bug.
		_, err := New(context.Background(), Options{TrustDomain: testTD, StateDir: dir, X509SVIDTTL: time.Hour, JWTSVIDTTL: time.Minute})
		if err == nil || !strings.Contains(err.Error(), "intermediate TTL must be positive") {
			t.Fatalf("New with no intermediate TTL = %v", err)
		}
	})
}

func TestIntermediateRotation(t *testing.T) {
	fc := newFakeClock()
	a := newSelfManaged(t, t.TempDir(), fc, func(o *Options) {
		o.IntermediateTTL = 2 * time.Hour
		o.X509SVIDTTL = 90 * time.Minute
	})
	before := mintX509(t, a, testID)
	inter1 := before.Certificates[1]
	if want := fc.Now().Add(2 * time.Hour); inter1.NotAfter.After(want) || want.Sub(inter1.NotAfter) > time.Second {
		t.Errorf("intermediate NotAfter = %s, want now+2h", inter1.NotAfter)
	}
	if before.Certificates[0].NotAfter.After(inter1.NotAfter) {
		t.Error("leaf outlives its intermediate")
	}

	runAuthority(t, a)
	changed := a.Changed()
	waitForWaiters(t, fc)
	fc.Step(59 * time.Minute)
	select {
	case <-changed:
		t.Fatal("Changed fired before half life")
	default:
	}
	// The leaf's 90m TTL is now clamped by the intermediate's remaining 61m.
	clamped := mintX509(t, a, testID)
	if clamped.Certificates[1] != inter1 || !clamped.Certificates[0].NotAfter.Equal(inter1.NotAfter) {
		t.Errorf("leaf NotAfter %s, want clamped to intermediate %s", clamped.Certificates[0].NotAfter, inter1.NotAfter)
	}

	waitForWaiters(t, fc)
	fc.Step(2 * time.Minute) // past half life
	waitClosed(t, changed, "Changed after intermediate half life")

	after := mintX509(t, a, testID)
	inter2 := after.Certificates[1]
	if inter2.SerialNumber.Cmp(inter1.SerialNumber) == 0 {
		t.Fatal("intermediate not rotated")
	}
	if err := after.Certificates[0].CheckSignatureFrom(inter2); err != nil {
		t.Errorf("new leaf does not chain to the new intermediate: %v", err)
	}
	if after.Certificates[0].NotAfter.After(inter2.NotAfter) {
		t.Error("leaf outlives the new intermediate")
	}
	now := fc.Now()
	if err := verifyX509(after, a.Bundle(), now); err != nil {
		t.Errorf("new SVID: %v", err)
	}
	// Leaves of the previous intermediate stay valid: same root.
	if err := verifyX509(before, a.Bundle(), now); err != nil {
		t.Errorf("SVID from the previous intermediate no longer verifies: %v", err)
	}
}

// Mint must not hand out a leaf under an expired intermediate even when Run
// is not running (for example stalled): it rotates on demand.
func TestMintRotatesWithoutRun(t *testing.T) {
	fc := newFakeClock()
	a := newSelfManaged(t, t.TempDir(), fc, func(o *Options) { o.IntermediateTTL = time.Hour })
	inter1 := mintX509(t, a, testID).Certificates[1]
	changed := a.Changed()
	fc.Step(3 * time.Hour)
	s := mintX509(t, a, testID)
	if s.Certificates[1] == inter1 {
		t.Fatal("leaf signed by a stale intermediate")
	}
	if err := verifyX509(s, a.Bundle(), fc.Now()); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, changed, "Changed after on-demand rotation")
}

func TestRootRotation(t *testing.T) {
	fc := newFakeClock()
	dir := t.TempDir()
	a := newSelfManaged(t, dir, fc, nil)
	root1 := a.Bundle().X509Authorities()[0]
	jwt1 := a.Bundle().JWTAuthorities()
	runAuthority(t, a)

	// Step in intermediate-sized hops to two thirds of the root's life.
	changed := a.Changed()
	for fc.Now().Before(rootRotateAt(root1)) {
		waitForWaiters(t, fc)
		fc.Step(12 * time.Hour)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(a.Bundle().X509Authorities()) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("root not rotated after two thirds of its life")
		}
		time.Sleep(time.Millisecond)
	}
	waitClosed(t, changed, "Changed")
	roots := a.Bundle().X509Authorities()
	if !roots[1].Equal(root1) || roots[0].Equal(root1) {
		t.Fatalf("bundle roots = new? %v, old kept? %v", !roots[0].Equal(root1), roots[1].Equal(root1))
	}
	s := mintX509(t, a, testID)
	if err := s.Certificates[1].CheckSignatureFrom(roots[0]); err != nil {
		t.Errorf("intermediate not issued by the new root: %v", err)
	}
	if err := verifyX509(s, a.Bundle(), fc.Now()); err != nil {
		t.Error(err)
	}
	if len(a.Bundle().JWTAuthorities()) != 1 {
		t.Error("JWT authorities changed with the root")
	}
	for kid := range jwt1 {
		if !a.Bundle().HasJWTAuthority(kid) {
			t.Error("JWT key changed with the root")
		}
	}

	// The rotation is persisted: a restart sees both roots.
	b := newSelfManaged(t, dir, fc, nil)
	if !b.Bundle().Equal(a.Bundle()) {
		t.Error("restart after root rotation changed the bundle")
	}

	// Once the old root expires it leaves the bundle.
	for fc.Now().Before(root1.NotAfter.Add(time.Second)) {
		waitForWaiters(t, fc)
		fc.Step(12 * time.Hour)
	}
	deadline = time.Now().Add(10 * time.Second)
	for len(a.Bundle().X509Authorities()) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("expired root still in the bundle")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestConcurrentMintDuringRotation(t *testing.T) {
	fc := newFakeClock()
	a := newSelfManaged(t, t.TempDir(), fc, func(o *Options) { o.IntermediateTTL = time.Hour })
	runAuthority(t, a)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				s, err := a.MintX509SVID(context.Background(), testID, nil)
				if err != nil {
					errs <- err
					return
				}
				if s.Certificates[0].NotAfter.After(s.Certificates[1].NotAfter) {
					errs <- errLeafOutlives
				}
				_ = a.Bundle()
			}
		}()
	}
	for range 10 {
		fc.Step(20 * time.Minute)
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

type testErr string

func (e testErr) Error() string { return string(e) }

const errLeafOutlives = testErr("leaf outlives intermediate")

// A root rotation that cannot be persisted keeps the valid root, keeps
// minting, and retries later instead of spinning.
func TestRootRotationWriteFailure(t *testing.T) {
	fc := newFakeClock()
	dir := t.TempDir()
	a := newSelfManaged(t, dir, fc, nil)
	root := a.Bundle().X509Authorities()[0]
	// Make the atomic rename fail: the state path becomes a non-empty directory.
	path := filepath.Join(dir, StateFile)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(path, "blocker"), 0o700); err != nil {
		t.Fatal(err)
	}
	runAuthority(t, a)

	waitForWaiters(t, fc)
	fc.SetTime(rootRotateAt(root).Add(time.Minute))
	waitForWaiters(t, fc)
	a.mu.RLock()
	next := a.nextCheck
	a.mu.RUnlock()
	if !next.After(fc.Now()) || next.After(fc.Now().Add(retryAfter)) {
		t.Errorf("next check at %s, want a retry within %s of now %s", next, retryAfter, fc.Now())
	}
	if roots := a.Bundle().X509Authorities(); len(roots) != 1 || !roots[0].Equal(root) {
		t.Error("bundle changed although the new root could not be persisted")
	}
	s := mintX509(t, a, testID)
	if err := verifyX509(s, a.Bundle(), fc.Now()); err != nil {
		t.Errorf("minting under the old root after a failed rotation: %v", err)
	}
}
