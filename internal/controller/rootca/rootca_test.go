package rootca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/controller/issue"
)

var (
	td = spiffeid.RequireTrustDomainFromString("example.org")
	t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
)

const rootTTL = 30 * time.Hour

func newRoot(t *testing.T, at time.Time) issue.Parent {
	t.Helper()
	r, err := issue.Root(td, at, rootTTL)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func same(a, b *x509.Certificate) bool { return a != nil && b != nil && bytes.Equal(a.Raw, b.Raw) }

func bundleHas(s State, certs ...*x509.Certificate) bool {
	b := s.Bundle()
	if len(b) != len(certs) {
		return false
	}
	for _, c := range certs {
		found := false
		for _, x := range b {
			found = found || same(x, c)
		}
		if !found {
			return false
		}
	}
	return true
}

// roundTrip is what a new leader reads back from the Secret.
func roundTrip(t *testing.T, s State) State {
	t.Helper()
	data, ann, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range ann {
		if v == "" {
			delete(ann, k)
		}
	}
	got, err := Decode(data, ann)
	if err != nil {
		t.Fatalf("Decode(Encode(state)): %v", err)
	}
	return got
}

func TestRotationTimeline(t *testing.T) {
	p := Policy{ActivationDelay: 10 * time.Minute, Retain: 6 * time.Hour}
	clock := t0
	var generated []issue.Parent
	gen := func() (issue.Parent, error) {
		r, err := issue.Root(td, clock, rootTTL)
		generated = append(generated, r)
		return r, err
	}
	r1 := newRoot(t, t0)
	s := State{Current: r1, Managed: true}
	step := func(at time.Time) bool {
		t.Helper()
		clock = at
		next, changed, err := Step(s, at, p, gen)
		if err != nil {
			t.Fatal(err)
		}
		s = roundTrip(t, next)
		return changed
	}
	rotateAt := t0.Add(20 * time.Hour) // 2/3 of 30h
	if got := Wake(s); !got.Equal(rotateAt) {
		t.Fatalf("Wake = %s, want %s (2/3 of the root's life)", got, rotateAt)
	}
	if step(rotateAt.Add(-time.Second)) || len(generated) != 0 {
		t.Fatal("rotated before 2/3 of the root's life")
	}

	// Due: the next root is published, the current one still signs.
	if !step(rotateAt) || len(generated) != 1 || s.Next == nil {
		t.Fatal("no next root at 2/3 of the root's life")
	}
	r2 := generated[0]
	if !same(s.Current.Cert, r1.Cert) || !same(s.Next.Cert, r2.Cert) || !bundleHas(s, r1.Cert, r2.Cert) {
		t.Fatal("next root not published beside the current one")
	}
	activates := rotateAt.Add(p.ActivationDelay)
	if !s.NextActivates.Equal(activates) || !Wake(s).Equal(activates) {
		t.Fatalf("next activates at %s (wake %s), want %s", s.NextActivates, Wake(s), activates)
	}
	if step(activates.Add(-time.Second)) || !same(s.Current.Cert, r1.Cert) {
		t.Fatal("next root signs before the activation delay passed")
	}

	// Activation: the next root signs, the old one stays published.
	if !step(activates) || !same(s.Current.Cert, r2.Cert) || s.Next != nil {
		t.Fatal("next root did not become the signer at its activation")
	}
	until := activates.Add(p.Retain)
	if !bundleHas(s, r2.Cert, r1.Cert) || !s.PreviousUntil.Equal(until) {
		t.Fatalf("previous root not kept until %s (got until %s)", until, s.PreviousUntil)
	}
	if step(until.Add(-time.Second)) || !bundleHas(s, r2.Cert, r1.Cert) {
		t.Fatal("previous root dropped while what it signed may live")
	}
	if !step(until) || !bundleHas(s, r2.Cert) || len(s.Previous) != 0 {
		t.Fatal("previous root kept after the last intermediate it signed expired")
	}
	if len(generated) != 1 {
		t.Fatalf("%d roots generated, want 1", len(generated))
	}
}

func TestRotateRequested(t *testing.T) {
	p := Policy{ActivationDelay: time.Minute, Retain: time.Hour}
	n := 0
	gen := func() (issue.Parent, error) { n++; return issue.Root(td, t0, rootTTL) }
	s := State{Current: newRoot(t, t0), Managed: true, RotateRequested: true}
	s, changed, err := Step(s, t0.Add(time.Minute), p, gen)
	if err != nil || !changed || s.Next == nil || s.RotateRequested || n != 1 {
		t.Fatalf("rotate request: changed %v next %v requested %v generated %d err %v", changed, s.Next != nil, s.RotateRequested, n, err)
	}
	// Asked again while a rotation runs: the request is cleared, no third root.
	s.RotateRequested = true
	s, changed, _ = Step(s, t0.Add(90*time.Second), p, gen)
	if !changed || s.RotateRequested || n != 1 {
		t.Fatalf("second request: changed %v requested %v generated %d", changed, s.RotateRequested, n)
	}
}

func TestUserRootNotRotated(t *testing.T) {
	p := Policy{ActivationDelay: time.Minute, Retain: time.Hour}
	gen := func() (issue.Parent, error) {
		t.Fatal("generated a root for a user-supplied Secret")
		return issue.Parent{}, nil
	}
	r1 := newRoot(t, t0)
	s := State{Current: r1, RotateRequested: true}
	s, _, err := Step(s, t0.Add(29*time.Hour), p, gen)
	if err != nil || s.Next != nil {
		t.Fatalf("user root rotated: next %v err %v", s.Next != nil, err)
	}
	// The user replaces the root: published first, signing after the delay.
	r2 := newRoot(t, t0.Add(time.Hour))
	at := t0.Add(2 * time.Hour)
	s, changed := Adopt(s, r2, at, p)
	if !changed || !same(s.Current.Cert, r1.Cert) || !bundleHas(s, r1.Cert, r2.Cert) {
		t.Fatal("user's new root not published before it signs")
	}
	if _, again := Adopt(s, r2, at.Add(time.Second), p); again {
		t.Fatal("adopting the same root twice restarted its delay")
	}
	s, _, _ = Step(s, at.Add(p.ActivationDelay), p, gen)
	if !same(s.Current.Cert, r2.Cert) || !bundleHas(s, r2.Cert, r1.Cert) {
		t.Fatal("user's new root not signing after the delay, or the old one not kept")
	}
}

func TestExpiredCurrentActivatesNextAtOnce(t *testing.T) {
	p := Policy{ActivationDelay: time.Hour, Retain: time.Hour}
	r1, r2 := newRoot(t, t0), newRoot(t, t0.Add(20*time.Hour))
	s := State{Current: r1, Next: &r2, NextActivates: t0.Add(40 * time.Hour), Managed: true}
	s, _, err := Step(s, r1.Cert.NotAfter, p, nil)
	if err != nil || !same(s.Current.Cert, r2.Cert) {
		t.Fatalf("an expired current root still signs (err %v)", err)
	}
	if len(s.Previous) != 0 {
		t.Fatal("an expired root is still published")
	}
}

func pemKey(t *testing.T, k any) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func TestDecode(t *testing.T) {
	r := newRoot(t, t0)
	certPEM := EncodeCertificates([]*x509.Certificate{r.Cert})
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalECPrivateKey(r.Key.(*ecdsa.PrivateKey))
	sec1 := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER})
	leaf, err := issue.SVID(r, other.Public(), spiffeid.RequireFromString("spiffe://example.org/w"), nil, t0, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		data    map[string][]byte
		ann     map[string]string
		managed bool
		err     string
	}{
		{name: "user secret, PKCS#8", data: map[string][]byte{KeyCert: certPEM, KeyKey: pemKey(t, r.Key)}},
		{name: "user secret, SEC1", data: map[string][]byte{KeyCert: certPEM, KeyKey: sec1}},
		{name: "managed", data: map[string][]byte{KeyCert: certPEM, KeyKey: sec1}, ann: map[string]string{AnnotationManagedBy: ManagedBy}, managed: true},
		{name: "no certificate", data: map[string][]byte{KeyKey: sec1}, err: "certificate"},
		{name: "no key", data: map[string][]byte{KeyCert: certPEM}, err: "key"},
		{name: "key of another certificate", data: map[string][]byte{KeyCert: certPEM, KeyKey: pemKey(t, other)}, err: "does not match"},
		{name: "not a CA", data: map[string][]byte{KeyCert: EncodeCertificates([]*x509.Certificate{leaf}), KeyKey: pemKey(t, other)}, err: "not a CA"},
		{name: "a key where the certificate goes", data: map[string][]byte{KeyCert: sec1, KeyKey: sec1}, err: "certificate"},
		{name: "encrypted key", data: map[string][]byte{KeyCert: certPEM, KeyKey: pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}})}, err: "private key"},
		{name: "managed next without its time", data: map[string][]byte{KeyCert: certPEM, KeyKey: sec1, KeyNextCert: certPEM, KeyNextKey: sec1},
			ann: map[string]string{AnnotationManagedBy: ManagedBy}, err: AnnotationNextActivates},
		{name: "managed next without its key", data: map[string][]byte{KeyCert: certPEM, KeyKey: sec1, KeyNextCert: certPEM},
			ann: map[string]string{AnnotationManagedBy: ManagedBy}, err: KeyNextKey},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Decode(tt.data, tt.ann)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Decode error %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !same(s.Current.Cert, r.Cert) || s.Managed != tt.managed {
				t.Fatalf("Decode: managed %v, want %v", s.Managed, tt.managed)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	r, err := issue.Root(td, t0, rootTTL)
	if err != nil {
		f.Fatal(err)
	}
	certPEM := EncodeCertificates([]*x509.Certificate{r.Cert})
	der, _ := x509.MarshalPKCS8PrivateKey(r.Key)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	f.Add(certPEM, keyPEM, []byte(nil), "")
	f.Add(certPEM, keyPEM, certPEM, "2026-12-01T12:00:00Z")
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), []byte("x"), []byte("y"), "z")
	f.Fuzz(func(t *testing.T, crt, key, prev []byte, until string) {
		s, err := Decode(map[string][]byte{KeyCert: crt, KeyKey: key, KeyPreviousCert: prev},
			map[string]string{AnnotationManagedBy: ManagedBy, AnnotationPreviousUntil: until})
		if err != nil {
			return
		}
		if pub, ok := s.Current.Key.Public().(interface{ Equal(crypto.PublicKey) bool }); !s.Current.Cert.IsCA || !ok || !pub.Equal(s.Current.Cert.PublicKey) {
			t.Fatal("Decode accepted a root that is not a CA or whose key does not match")
		}
	})
}

func TestHolderSignSVID(t *testing.T) {
	h := NewHolder(td, func() time.Time { return t0.Add(time.Hour) })
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id := spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	if _, err := h.SignSVID(context.Background(), k.Public(), id, nil, time.Hour); err != ErrNoRoot {
		t.Fatalf("SignSVID without a root: %v, want ErrNoRoot", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := h.Wait(ctx); err == nil {
		t.Fatal("Wait returned with no root loaded")
	}
	r := newRoot(t, t0) // expires t0+30h
	h.Set(State{Current: r})
	h.Set(State{Current: r})
	if err := h.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	chain, err := h.SignSVID(context.Background(), k.Public(), id, []string{"web"}, 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 || chain[0].CheckSignatureFrom(r.Cert) != nil {
		t.Fatalf("chain of %d, want the leaf alone, signed by the root", len(chain))
	}
	if !chain[0].NotAfter.Equal(r.Cert.NotAfter) {
		t.Fatalf("NotAfter %s, want clamped to the root's %s", chain[0].NotAfter, r.Cert.NotAfter)
	}
	if _, err := h.SignSVID(context.Background(), k.Public(), spiffeid.RequireFromString("spiffe://other.org/w"), nil, time.Hour); err == nil {
		t.Fatal("signed an ID of another trust domain")
	}
	if got := h.Expiry(); !got.Equal(r.Cert.NotAfter) {
		t.Fatalf("Expiry %s", got)
	}
	h.Clear()
	if !h.Expiry().IsZero() {
		t.Fatal("Expiry after Clear")
	}
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := h.Wait(ctx); err == nil {
		t.Fatal("Wait returned after Clear")
	}
}
