package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"k8s.io/klog/v2"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// secretOf is the content of a kubernetes.io/tls Secret holding u.
func secretOf(t testing.TB, u upstreamCA) map[string][]byte {
	t.Helper()
	cert, err := os.ReadFile(u.certFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(u.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{"tls.crt": cert, "tls.key": key}
}

// newFromVolume is an upstream authority reading its CA from a Secret volume.
func newFromVolume(t testing.TB, vol *testutil.Volume, fc *clocktesting.FakeClock) *Authority {
	t.Helper()
	a, err := newCA(context.Background(), Options{
		TrustDomain: testTD, UpstreamCertFile: vol.Path("tls.crt"), UpstreamKeyFile: vol.Path("tls.key"), Clock: fc,
	})
	if err != nil {
		t.Fatalf("New (upstream volume): %v", err)
	}
	return a
}

func bundleOf(certs ...*x509.Certificate) *spiffebundle.Bundle {
	return spiffebundle.FromX509Authorities(testTD, certs)
}

// sameCertSet reports whether got holds exactly want, in any order.
func sameCertSet(got []*x509.Certificate, want ...*x509.Certificate) bool {
	return len(got) == len(want) && !slices.ContainsFunc(want, func(w *x509.Certificate) bool {
		return !slices.ContainsFunc(got, w.Equal)
	})
}

// fired reports whether a's Changed fired since it returned ch: firing
// replaces the channel.
func fired(a *Authority, ch <-chan struct{}) bool { return a.Changed() != ch }

// stepRun moves the fake clock by d once Run sleeps, and waits until Run
// has done its work and sleeps again.
func stepRun(t *testing.T, fc *clocktesting.FakeClock, d time.Duration) {
	t.Helper()
	waitForWaiters(t, fc)
	fc.Step(d)
	waitForWaiters(t, fc)
}

// A kubelet-style swap of the Secret is picked up by Run without a restart:
// the new CA issues at once, the old one and its JWT key stay in the bundle
// while what they signed lives, and Changed fires at every step.
func TestUpstreamReload(t *testing.T) {
	for _, kind := range []upstreamKind{upstreamKinds[0], upstreamKinds[2]} {
		t.Run(kind.name, func(t *testing.T) {
			fc := newFakeClock()
			up1, up2 := writeUpstream(t, kind, fc.Now()), writeUpstream(t, kind, fc.Now())
			vol := testutil.NewVolume(t, secretOf(t, up1))
			a := newFromVolume(t, vol, fc)
			oldSVID, oldJWT := mintX509(t, a, testID), mintJWT(t, a, testID, "aud")
			oldBundle := a.Bundle()
			runAuthority(t, a)

			changed := a.Changed()
			vol.Publish(secretOf(t, up2))
			stepRun(t, fc, upstreamPollInterval)
			waitClosed(t, changed, "Changed after the Secret swap")

			b := a.Bundle()
			if !sameCertSet(b.X509Authorities(), up2.cert, up1.cert) {
				t.Fatalf("bundle X.509 authorities after the swap: %d, want the new and the old upstream CA", len(b.X509Authorities()))
			}
			if n := len(b.JWTAuthorities()); n != 2 {
				t.Errorf("bundle JWT authorities after the swap: %d, want the new and the old key", n)
			}
			newSVID := mintX509(t, a, testID)
			now := fc.Now()
			for _, c := range []struct {
				name   string
				err    error
				wantOK bool
			}{
				{"new SVID, new CA alone", verifyX509(newSVID, bundleOf(up2.cert), now), true},
				{"new SVID, old CA alone", verifyX509(newSVID, bundleOf(up1.cert), now), false},
				{"old SVID, bundle after the swap", verifyX509(oldSVID, b, now), true},
				{"old JWT, bundle after the swap", validateJWT(oldJWT, b, "aud"), true},
				{"new JWT, bundle after the swap", validateJWT(mintJWT(t, a, testID, "aud"), b, "aud"), true},
				{"new JWT, bundle before the swap", validateJWT(mintJWT(t, a, testID, "aud"), oldBundle, "aud"), false},
				// Another agent started on the new Secret derives the same JWT key.
				{"new JWT, fresh agent on the new CA", validateJWT(mintJWT(t, a, testID, "aud"), newUpstream(t, up2, fc).Bundle(), "aud"), true},
			} {
				if (c.err == nil) != c.wantOK {
					t.Errorf("%s: err = %v, want ok=%v", c.name, c.err, c.wantOK)
				}
			}

			// Tokens signed with the old key have expired: it leaves the bundle.
			changed = a.Changed()
			stepRun(t, fc, a.jwtTTL+upstreamGrace+time.Second)
			waitClosed(t, changed, "Changed when the old JWT key retires")
			b = a.Bundle()
			if n := len(b.JWTAuthorities()); n != 1 || !sameCertSet(b.X509Authorities(), up2.cert, up1.cert) {
				t.Errorf("after the JWT-SVID TTL: %d JWT and %d X.509 authorities, want 1 and 2", n, len(b.X509Authorities()))
			}

			// Every intermediate the old CA signed has expired: it leaves too.
			changed = a.Changed()
			stepRun(t, fc, a.interTTL)
			waitClosed(t, changed, "Changed when the old CA retires")
			if got := a.Bundle().X509Authorities(); !sameCertSet(got, up2.cert) {
				t.Errorf("after the intermediate TTL: %d X.509 authorities, want only the new CA", len(got))
			}
		})
	}
}

// Swapping back to a previous CA makes it active again, listed once.
func TestUpstreamReloadBack(t *testing.T) {
	fc := newFakeClock()
	up1, up2 := writeUpstream(t, upstreamKinds[0], fc.Now()), writeUpstream(t, upstreamKinds[0], fc.Now())
	vol := testutil.NewVolume(t, secretOf(t, up1))
	a := newFromVolume(t, vol, fc)
	for _, u := range []upstreamCA{up2, up1} {
		vol.Publish(secretOf(t, u))
		if err := a.reloadUpstream(); err != nil {
			t.Fatal(err)
		}
	}
	b := a.Bundle()
	if !sameCertSet(b.X509Authorities(), up1.cert, up2.cert) || len(b.JWTAuthorities()) != 2 {
		t.Fatalf("bundle: %d X.509 and %d JWT authorities, want 2 and 2", len(b.X509Authorities()), len(b.JWTAuthorities()))
	}
	if err := verifyX509(mintX509(t, a, testID), bundleOf(up1.cert), fc.Now()); err != nil {
		t.Errorf("after swapping back, leaves do not chain to the first CA: %v", err)
	}
}

// A broken new pair keeps the current CA serving, is reported once with
// the reason, and the next good pair is taken.
func TestUpstreamReloadBrokenPair(t *testing.T) {
	fc := newFakeClock()
	now := fc.Now()
	ec := upstreamKinds[0]
	up1, up2, up3 := writeUpstream(t, ec, now), writeUpstream(t, ec, now), writeUpstream(t, ec, now)
	notCA := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.IsCA = false; c.KeyUsage = x509.KeyUsageDigitalSignature })
	otherTD := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.URIs = []*url.URL{{Scheme: "spiffe", Host: "other.org"}} })
	expired := writeUpstream(t, ec, now, func(c *x509.Certificate) { c.NotAfter = now.Add(-time.Minute) })

	with := func(u upstreamCA, mod func(map[string][]byte)) map[string][]byte {
		s := secretOf(t, u)
		mod(s)
		return s
	}
	tests := []struct {
		name     string
		secret   map[string][]byte
		wantText string
	}{
		{"half-written key", with(up2, func(s map[string][]byte) { s["tls.key"] = s["tls.key"][:len(s["tls.key"])/2] }), "no private key found"},
		{"mismatched key", with(up2, func(s map[string][]byte) { s["tls.key"] = secretOf(t, up3)["tls.key"] }), "does not match"},
		{"unparsable cert", with(up2, func(s map[string][]byte) { s["tls.crt"] = []byte("not PEM") }), "no certificate found"},
		{"key missing", with(up2, func(s map[string][]byte) { delete(s, "tls.key") }), "no such file"},
		{"not a CA", secretOf(t, notCA), "not a CA"},
		{"other trust domain", secretOf(t, otherTD), `trust domain "other.org"`},
		{"expired", secretOf(t, expired), "expired at"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vol := testutil.NewVolume(t, secretOf(t, up1))
			a := newFromVolume(t, vol, fc)
			before, changed := a.Bundle(), a.Changed()

			vol.Publish(tt.secret)
			err := a.reloadUpstream()
			if err == nil || !strings.Contains(err.Error(), tt.wantText) {
				t.Fatalf("reload error = %v, want one containing %q", err, tt.wantText)
			}
			if err := a.reloadUpstream(); err != nil {
				t.Errorf("the same broken pair was reported twice: %v", err)
			}
			if !a.Bundle().Equal(before) || fired(a, changed) {
				t.Error("a broken pair changed the bundle or fired Changed")
			}
			if err := verifyX509(mintX509(t, a, testID), bundleOf(up1.cert), fc.Now()); err != nil {
				t.Errorf("after a broken pair, leaves no longer chain to the current CA: %v", err)
			}

			vol.Publish(secretOf(t, up2))
			if err := a.reloadUpstream(); err != nil {
				t.Fatalf("good pair after a broken one: %v", err)
			}
			if !fired(a, changed) || !sameCertSet(a.Bundle().X509Authorities(), up2.cert, up1.cert) {
				t.Error("the good pair after a broken one was not taken")
			}
		})
	}
}

// A CA not valid yet is refused, and taken once it is, with no new change
// of the files.
func TestUpstreamReloadNotYetValid(t *testing.T) {
	fc := newFakeClock()
	up1 := writeUpstream(t, upstreamKinds[0], fc.Now())
	future := writeUpstream(t, upstreamKinds[0], fc.Now(), func(c *x509.Certificate) { c.NotBefore = fc.Now().Add(time.Minute) })
	vol := testutil.NewVolume(t, secretOf(t, up1))
	a := newFromVolume(t, vol, fc)
	vol.Publish(secretOf(t, future))
	if err := a.reloadUpstream(); err == nil || !strings.Contains(err.Error(), "not valid before") {
		t.Fatalf("reload error = %v, want not valid before", err)
	}
	fc.Step(2 * time.Minute)
	if err := a.reloadUpstream(); err != nil {
		t.Fatal(err)
	}
	if got := a.Bundle().X509Authorities(); !sameCertSet(got, future.cert, up1.cert) {
		t.Errorf("bundle has %d X.509 authorities, want the now valid CA and the previous one", len(got))
	}
}

// Run logs a broken pair once, however many polls see it.
func TestUpstreamReloadLogsOnce(t *testing.T) {
	var (
		mu    sync.Mutex
		lines []string
	)
	klog.SetLogger(funcr.New(func(_, args string) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, args)
	}, funcr.Options{}))
	t.Cleanup(klog.ClearLogger)

	fc := newFakeClock()
	up1, up2, up3 := writeUpstream(t, upstreamKinds[0], fc.Now()), writeUpstream(t, upstreamKinds[0], fc.Now()), writeUpstream(t, upstreamKinds[0], fc.Now())
	vol := testutil.NewVolume(t, secretOf(t, up1))
	a := newFromVolume(t, vol, fc)
	runAuthority(t, a)
	broken := secretOf(t, up2)
	broken["tls.key"] = secretOf(t, up3)["tls.key"]
	vol.Publish(broken)
	for range 3 {
		stepRun(t, fc, upstreamPollInterval)
	}

	mu.Lock()
	defer mu.Unlock()
	var logged []string
	for _, l := range lines {
		if strings.Contains(l, "Upstream CA files not loaded") {
			logged = append(logged, l)
		}
	}
	if len(logged) != 1 || !strings.Contains(logged[0], "does not match") || !strings.Contains(logged[0], vol.Path("tls.crt")) {
		t.Errorf("logged %d times, want once with the reason and the path: %q", len(logged), logged)
	}
}

// FuzzUpstreamParse: a new Secret's content must never crash the agent,
// and whatever is accepted is a CA whose key matches it.
func FuzzUpstreamParse(f *testing.F) {
	now := time.Now()
	s1, s2 := secretOf(f, writeUpstream(f, upstreamKinds[0], now)), secretOf(f, writeUpstream(f, upstreamKinds[0], now))
	f.Add(s1["tls.crt"], s1["tls.key"])
	f.Add(s1["tls.crt"], s2["tls.key"])
	f.Add(s1["tls.crt"][:len(s1["tls.crt"])/2], s1["tls.key"])
	f.Add([]byte{}, []byte{})
	u := &upstreamFiles{certFile: "tls.crt", keyFile: "tls.key"}
	f.Fuzz(func(t *testing.T, certPEM, keyPEM []byte) {
		up, err := u.parse(certPEM, keyPEM, testTD, now)
		if err != nil {
			return
		}
		if !up.cert.IsCA || !up.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(up.cert.PublicKey) {
			t.Fatal("accepted a pair that is not a CA with its key")
		}
	})
}
