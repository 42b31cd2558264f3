package federation

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"
)

var (
	own     = spiffeid.RequireTrustDomainFromString("cluster.local")
	partner = spiffeid.RequireTrustDomainFromString("partner.example")
	other   = spiffeid.RequireTrustDomainFromString("other.example")
)

func newCA(t testing.TB, td spiffeid.TrustDomain, serial int64) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{Organization: []string{"test"}, CommonName: td.Name()},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func pemOf(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// jwksOf marshals a SPIFFE bundle with the CA and one JWT key "kid".
func jwksOf(t testing.TB, td spiffeid.TrustDomain, ca *x509.Certificate, kid string) []byte {
	t.Helper()
	b := spiffebundle.New(td)
	b.AddX509Authority(ca)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AddJWTAuthority(kid, key.Public()); err != nil {
		t.Fatal(err)
	}
	data, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func sameCerts(got, want []*x509.Certificate) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if !got[i].Equal(want[i]) {
			return false
		}
	}
	return true
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func TestNewLoadsBothFormats(t *testing.T) {
	dir := t.TempDir()
	partnerCA := newCA(t, partner, 1)
	otherCA1, otherCA2 := newCA(t, other, 2), newCA(t, other, 3)
	writeFile(t, filepath.Join(dir, "partner.json"), jwksOf(t, partner, partnerCA, "key-1"))
	writeFile(t, filepath.Join(dir, "other.pem"), pemOf(otherCA1, otherCA2))

	w, err := New([]Source{
		{TrustDomain: "partner.example", Path: filepath.Join(dir, "partner.json")},
		{TrustDomain: "spiffe://other.example", Path: filepath.Join(dir, "other.pem"), Format: "pem"},
	}, Options{OwnTrustDomain: own})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	bundles := w.Bundles()
	if len(bundles) != 2 {
		t.Fatalf("Bundles has %d trust domains, want 2", len(bundles))
	}
	pb := bundles[partner]
	if pb == nil || pb.TrustDomain() != partner || !sameCerts(pb.X509Authorities(), []*x509.Certificate{partnerCA}) || !pb.HasJWTAuthority("key-1") {
		t.Errorf("partner bundle = %+v", pb)
	}
	ob := bundles[other]
	if ob == nil || ob.TrustDomain() != other || !sameCerts(ob.X509Authorities(), []*x509.Certificate{otherCA1, otherCA2}) || len(ob.JWTAuthorities()) != 0 {
		t.Errorf("other bundle = %+v", ob)
	}

	// A snapshot is the caller's to change.
	pb.RemoveX509Authority(partnerCA)
	if got := w.Bundles()[partner].X509Authorities(); len(got) != 1 {
		t.Errorf("changing a snapshot changed the watcher: %d authorities left", len(got))
	}

	empty, err := New(nil, Options{OwnTrustDomain: own})
	if err != nil || len(empty.Bundles()) != 0 {
		t.Errorf("New(nil) = %v, %v", empty.Bundles(), err)
	}
}

func TestNewErrors(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.pem")
	writeFile(t, good, pemOf(newCA(t, partner, 1)))
	files := map[string][]byte{
		"bad.json":    []byte("{not json"),
		"nokeys.json": []byte(`{"keys":[]}`),
		"bad.pem":     []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
		"empty.pem":   nil,
		"text.pem":    []byte("hello"),
		"huge.pem":    make([]byte, maxBundleSize+1),
	}
	for name, data := range files {
		writeFile(t, filepath.Join(dir, name), data)
	}
	src := func(td, name, format string) Source {
		return Source{TrustDomain: td, Path: filepath.Join(dir, name), Format: format}
	}
	tests := []struct {
		name    string
		sources []Source
		want    string
	}{
		{"bad trust domain", []Source{{TrustDomain: "Partner.Example", Path: good, Format: "pem"}},
			`federation[0].trustDomain: "Partner.Example": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
		{"empty trust domain", []Source{{Path: good, Format: "pem"}},
			`federation[0].trustDomain: "": trust domain is missing`},
		{"trust domain with path", []Source{{TrustDomain: "spiffe://partner.example/x", Path: good, Format: "pem"}},
			`federation[0].trustDomain: "spiffe://partner.example/x": want a trust domain name or spiffe://<name>, without a path`},
		{"own trust domain", []Source{src("partner.example", "good.pem", "pem"), {TrustDomain: "spiffe://cluster.local", Path: good, Format: "pem"}},
			`federation[1].trustDomain: "cluster.local" is our own trust domain`},
		{"duplicate", []Source{src("partner.example", "good.pem", "pem"), src("spiffe://partner.example", "good.pem", "pem")},
			`federation[1].trustDomain: "partner.example" is already listed at federation[0]`},
		{"empty path", []Source{{TrustDomain: "partner.example"}},
			`federation[0].path: must not be empty`},
		{"unknown format", []Source{src("partner.example", "good.pem", "PEM")},
			`federation[0].format: unknown format "PEM" (want "spiffe" or "pem")`},
		{"missing file", []Source{src("partner.example", "good.pem", "pem"), src("other.example", "missing.json", "")},
			`federation[1].path: open ` + filepath.Join(dir, "missing.json") + `: no such file or directory`},
		{"not JSON", []Source{src("partner.example", "bad.json", "spiffe")},
			`federation[0].path: ` + filepath.Join(dir, "bad.json") + `: spiffebundle: unable to parse JWKS`},
		{"PEM as spiffe", []Source{src("partner.example", "good.pem", "")},
			`federation[0].path: ` + good + `: spiffebundle: unable to parse JWKS`},
		{"no keys", []Source{src("partner.example", "nokeys.json", "")},
			`federation[0].path: ` + filepath.Join(dir, "nokeys.json") + `: bundle holds no X.509 or JWT authorities`},
		{"bad certificate", []Source{src("partner.example", "bad.pem", "pem")},
			`federation[0].path: ` + filepath.Join(dir, "bad.pem") + `: x509bundle: cannot parse certificate`},
		{"empty PEM", []Source{src("partner.example", "empty.pem", "pem")},
			`federation[0].path: ` + filepath.Join(dir, "empty.pem") + `: bundle holds no X.509 or JWT authorities`},
		{"text as PEM", []Source{src("partner.example", "text.pem", "pem")},
			`federation[0].path: ` + filepath.Join(dir, "text.pem") + `: x509bundle: cannot parse certificate: no PEM blocks found`},
		{"huge file", []Source{src("partner.example", "huge.pem", "pem")},
			`federation[0].path: ` + filepath.Join(dir, "huge.pem") + `: larger than 4194304 bytes`},
		{"directory", []Source{{TrustDomain: "partner.example", Path: dir, Format: "pem"}},
			`federation[0].path: read ` + dir + `: is a directory`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w, err := New(tt.sources, Options{OwnTrustDomain: own})
			if err == nil {
				t.Fatalf("New succeeded, want %q", tt.want)
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("New error:\n got %q\nwant %q", err, tt.want)
			}
			if w != nil {
				t.Error("New returned a watcher with its error")
			}
		})
	}
}

// TestRunReloadsOnChange drives Run with a fake clock: nothing is read until
// the clock reaches the poll interval.
func TestRunReloadsOnChange(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "partner.json")
	ca1, ca2 := newCA(t, partner, 1), newCA(t, partner, 2)
	writeFile(t, path, jwksOf(t, partner, ca1, "key-1"))

	clk := clocktesting.NewFakeClock(time.Now())
	w, err := New([]Source{{TrustDomain: "partner.example", Path: path}}, Options{OwnTrustDomain: own, Clock: clk, PollInterval: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v after cancel", err)
		}
	})

	for range 2 {
		for !clk.HasWaiters() {
			time.Sleep(time.Millisecond)
		}
		changed := w.Changed()
		writeFile(t, path, jwksOf(t, partner, ca2, "key-2"))
		clk.Step(29 * time.Second)
		if isClosed(changed) {
			t.Fatal("Changed fired before the poll interval passed")
		}
		clk.Step(time.Second)
		waitClosed(t, changed, "Changed after the file changed")
		b := w.Bundles()[partner]
		if !sameCerts(b.X509Authorities(), []*x509.Certificate{ca2}) || !b.HasJWTAuthority("key-2") || b.HasJWTAuthority("key-1") {
			t.Fatalf("bundle after change = %+v", b)
		}
		ca1, ca2 = ca2, ca1 // and back, on the second round
	}
}

// TestInvalidUpdateKeepsPrevious polls by hand so that it can assert that a
// poll happened and changed nothing.
func TestInvalidUpdateKeepsPrevious(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "partner.pem")
	ca1, ca2 := newCA(t, partner, 1), newCA(t, partner, 2)
	writeFile(t, path, pemOf(ca1))
	w, err := New([]Source{{TrustDomain: "partner.example", Path: path, Format: "pem"}}, Options{OwnTrustDomain: own})
	if err != nil {
		t.Fatal(err)
	}
	keepsOld := func(step string) {
		t.Helper()
		changed := w.Changed()
		w.poll()
		if isClosed(changed) {
			t.Errorf("%s: Changed fired", step)
		}
		if got := w.Bundles()[partner].X509Authorities(); !sameCerts(got, []*x509.Certificate{ca1}) {
			t.Errorf("%s: bundle has %d authorities, want the previous one", step, len(got))
		}
	}

	keepsOld("unchanged file")
	writeFile(t, path, []byte("garbage"))
	keepsOld("garbage")
	writeFile(t, path, nil)
	keepsOld("emptied file")
	writeFile(t, path, pemOf(ca1)[:100])
	keepsOld("half-written file")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	keepsOld("removed file")
	keepsOld("still removed")
	// Back with the old content after an error: nothing changed.
	writeFile(t, path, pemOf(ca1))
	keepsOld("restored file")
	// Same certificates, different bytes: nothing to tell the workloads.
	writeFile(t, path, append([]byte("# partner CA\n"), pemOf(ca1)...))
	keepsOld("same bundle, new bytes")

	changed := w.Changed()
	writeFile(t, path, pemOf(ca1, ca2))
	w.poll()
	if !isClosed(changed) {
		t.Fatal("Changed did not fire for a new certificate")
	}
	if got := w.Bundles()[partner].X509Authorities(); !sameCerts(got, []*x509.Certificate{ca1, ca2}) {
		t.Errorf("bundle has %d authorities, want 2", len(got))
	}
	if isClosed(w.Changed()) {
		t.Error("the replacement Changed channel is already closed")
	}
}

// TestConfigMapSymlinkSwap reproduces how the kubelet updates a ConfigMap
// volume: the file is a symlink through "..data" to a timestamped directory,
// and an update atomically re-points "..data" and deletes the old directory.
// It runs on the real clock with a short interval.
func TestConfigMapSymlinkSwap(t *testing.T) {
	vol := t.TempDir()
	ca1, ca2 := newCA(t, partner, 1), newCA(t, partner, 2)
	publish := func(version string, data []byte) {
		t.Helper()
		dataDir := filepath.Join(vol, "..2025_01_01_00_00_0"+version)
		if err := os.Mkdir(dataDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dataDir, "bundle.json"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		old, _ := os.Readlink(filepath.Join(vol, "..data"))
		if err := os.Symlink(filepath.Base(dataDir), filepath.Join(vol, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(vol, "..data_tmp"), filepath.Join(vol, "..data")); err != nil {
			t.Fatal(err)
		}
		if old != "" {
			if err := os.RemoveAll(filepath.Join(vol, old)); err != nil {
				t.Fatal(err)
			}
		}
	}
	publish("1", jwksOf(t, partner, ca1, "key-1"))
	if err := os.Symlink("..data/bundle.json", filepath.Join(vol, "bundle.json")); err != nil {
		t.Fatal(err)
	}

	w, err := New([]Source{{TrustDomain: "partner.example", Path: filepath.Join(vol, "bundle.json")}},
		Options{OwnTrustDomain: own, PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})

	changed := w.Changed()
	publish("2", jwksOf(t, partner, ca2, "key-2"))
	waitClosed(t, changed, "Changed after the ConfigMap swap")
	b := w.Bundles()[partner]
	if !sameCerts(b.X509Authorities(), []*x509.Certificate{ca2}) || !b.HasJWTAuthority("key-2") {
		t.Errorf("bundle after swap = %+v", b)
	}
}

func TestChangedFiresOncePerPoll(t *testing.T) {
	dir := t.TempDir()
	p1, p2 := filepath.Join(dir, "p.pem"), filepath.Join(dir, "o.pem")
	writeFile(t, p1, pemOf(newCA(t, partner, 1)))
	writeFile(t, p2, pemOf(newCA(t, other, 1)))
	w, err := New([]Source{
		{TrustDomain: "partner.example", Path: p1, Format: "pem"},
		{TrustDomain: "other.example", Path: p2, Format: "pem"},
	}, Options{OwnTrustDomain: own})
	if err != nil {
		t.Fatal(err)
	}
	first := w.Changed()
	writeFile(t, p1, pemOf(newCA(t, partner, 2)))
	writeFile(t, p2, pemOf(newCA(t, other, 2)))
	w.poll()
	if !isClosed(first) {
		t.Fatal("Changed did not fire")
	}
	second := w.Changed()
	w.poll()
	if isClosed(second) {
		t.Error("Changed fired again without a change")
	}
}
