package federation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

// testCA is a CA of one trust domain that can sign SVIDs.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newTestCA(t testing.TB, td spiffeid.TrustDomain) testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: td.Name()},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return testCA{cert: cert, key: key}
}

// leaf signs a serving certificate with the SANs of san.
func (c testCA) leaf(t testing.TB, san *x509.Certificate) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		URIs: san.URIs, IPAddresses: san.IPAddresses,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return leaf, key
}

// svid signs an X.509-SVID for id.
func (c testCA) svid(t testing.TB, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	leaf, key := c.leaf(t, &x509.Certificate{URIs: []*url.URL{id.URL()}})
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}
}

func (c testCA) bundle(td spiffeid.TrustDomain, seq uint64, hint time.Duration) *spiffebundle.Bundle {
	b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{c.cert})
	b.SetSequenceNumber(seq)
	if hint > 0 {
		b.SetRefreshHint(hint)
	}
	return b
}

func marshal(t testing.TB, b *spiffebundle.Bundle) []byte {
	t.Helper()
	data, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// fixedSVID serves one SVID as the endpoint's.
type fixedSVID struct{ svid *x509svid.SVID }

func (f fixedSVID) X509SVID(context.Context, spiffeid.ID, []string) (*x509svid.SVID, bool, error) {
	return f.svid, false, nil
}

// peer is a partner.example bundle endpoint on loopback whose answer the
// test sets: a bundle document, or raw bytes and a status; and whose TLS
// side it can swap.
type peer struct {
	hs  *http.Server
	url string
	tls atomic.Pointer[tls.Config]

	mu     sync.Mutex
	body   []byte
	status int
}

func (p *peer) set(status int, body []byte) {
	p.mu.Lock()
	p.status, p.body = status, body
	p.mu.Unlock()
}

func (p *peer) close() { p.hs.Close() }

// startPeer serves TLS as cfg says.
func startPeer(t *testing.T, cfg *tls.Config) *peer {
	t.Helper()
	p := &peer{status: http.StatusOK}
	p.tls.Store(cfg)
	p.hs = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		p.mu.Lock()
		status, body := p.status, p.body
		p.mu.Unlock()
		w.WriteHeader(status)
		_, _ = w.Write(body)
	}), ErrorLog: log.New(io.Discard, "", 0)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serving := &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return p.tls.Load(), nil }}
	go func() { _ = p.hs.Serve(tls.NewListener(ln, serving)) }()
	t.Cleanup(p.close)
	p.url = "https://" + ln.Addr().String() + "/bundle"
	return p
}

// webTLS is the server side of an https_web endpoint on 127.0.0.1 with a
// certificate of ca.
func webTLS(t *testing.T, ca testCA) *tls.Config {
	t.Helper()
	leaf, key := ca.leaf(t, &x509.Certificate{IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}})
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw}, PrivateKey: key}}}
}

// spiffeTLS is the server side of an https_spiffe endpoint presenting svid.
func spiffeTLS(t *testing.T, bundleTD spiffeid.TrustDomain, svid *x509svid.SVID) *tls.Config {
	t.Helper()
	s, err := endpoint.NewServer(endpoint.ServerOptions{
		Bundle: staticBundle{spiffebundle.New(bundleTD)}, Profile: endpoint.ProfileHTTPSSPIFFE,
		SVIDs: fixedSVID{svid}, SPIFFEID: svid.ID,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s.TLSConfig()
}

type staticBundle struct{ b *spiffebundle.Bundle }

func (s staticBundle) Bundle() *spiffebundle.Bundle { return s.b.Clone() }

var endpointID = spiffeid.RequireFromString("spiffe://partner.example/bundle-endpoint")

// observed records the results told to Options.Observe.
type observed struct {
	mu      sync.Mutex
	results []string
}

func (o *observed) observe(r string) {
	o.mu.Lock()
	o.results = append(o.results, r)
	o.mu.Unlock()
}

func (o *observed) last() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.results) == 0 {
		return ""
	}
	return o.results[len(o.results)-1]
}

// captureLog sends klog's output to a buffer until the test ends.
func captureLog(t *testing.T) *testutil.LockedBuffer {
	l := &testutil.LockedBuffer{}
	klog.LogToStderr(false)
	klog.SetOutput(l)
	t.Cleanup(func() {
		klog.Flush()
		klog.SetOutput(os.Stderr)
		klog.LogToStderr(true)
	})
	return l
}

func writeInitial(t *testing.T, b *spiffebundle.Bundle) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "initial.json")
	writeFile(t, path, marshal(t, b))
	return path
}

func spiffeSource(url, initial string) Source {
	return Source{TrustDomain: "partner.example", Path: initial, BundleEndpoint: &Endpoint{URL: url, Profile: "https_spiffe", SPIFFEID: endpointID.String()}}
}

// The endpoint's bundle replaces the initial one, later changes follow by
// the refresh hint within the bounds, and the last good bundle survives a
// restart with the endpoint down.
func TestBundleEndpointRefresh(t *testing.T) {
	ca1, ca2 := newTestCA(t, partner), newTestCA(t, partner)
	p := startPeer(t, spiffeTLS(t, partner, ca1.svid(t, endpointID)))
	initial := writeInitial(t, ca1.bundle(partner, 1, 0))
	state := t.TempDir()
	var obs observed
	opts := Options{OwnTrustDomain: own, StateDir: state, MinRefresh: time.Second, MaxRefresh: 10 * time.Minute, Observe: obs.observe}
	w, err := New([]Source{spiffeSource(p.url, initial)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if b := w.Bundles()[partner]; b == nil || !sameCerts(b.X509Authorities(), []*x509.Certificate{ca1.cert}) {
		t.Fatalf("before the first fetch: %+v, want the initial bundle", b)
	}
	ctx := context.Background()
	f := w.files[0]

	tests := []struct {
		name    string
		serve   *spiffebundle.Bundle
		rotate  bool // the endpoint presents an SVID of ca2 from now on
		want    []*x509.Certificate
		changed bool
		next    time.Duration
	}{
		{"same bundle, hint within bounds", ca1.bundle(partner, 1, 10*time.Second), false, []*x509.Certificate{ca1.cert}, true, 10 * time.Second},
		{"a new authority, no hint", spiffebundle.FromX509Authorities(partner, []*x509.Certificate{ca1.cert, ca2.cert}), false, []*x509.Certificate{ca1.cert, ca2.cert}, true, DefaultRefresh},
		// The bundle it served authenticates the endpoint's new SVID; the
		// initial one could not.
		{"the endpoint rotated", spiffebundle.FromX509Authorities(partner, []*x509.Certificate{ca1.cert, ca2.cert}), true, []*x509.Certificate{ca1.cert, ca2.cert}, false, DefaultRefresh},
		{"the old one retired, hint below the minimum", ca2.bundle(partner, 3, time.Millisecond), false, []*x509.Certificate{ca2.cert}, true, time.Second},
		{"unchanged but the hint, above the maximum", ca2.bundle(partner, 3, time.Hour), false, []*x509.Certificate{ca2.cert}, true, 10 * time.Minute},
		{"unchanged", ca2.bundle(partner, 4, time.Hour), false, []*x509.Certificate{ca2.cert}, true, 10 * time.Minute},
		{"the same document again", ca2.bundle(partner, 4, time.Hour), false, []*x509.Certificate{ca2.cert}, false, 10 * time.Minute},
	}
	for _, tt := range tests {
		if tt.rotate {
			p.tls.Store(spiffeTLS(t, partner, ca2.svid(t, endpointID)))
		}
		p.set(http.StatusOK, marshal(t, tt.serve))
		changed := w.Changed()
		next := w.refresh(ctx, f)
		if got := obs.last(); got != ResultOK {
			t.Fatalf("%s: result %q, want ok", tt.name, got)
		}
		if isClosed(changed) != tt.changed {
			t.Errorf("%s: Changed fired %v, want %v", tt.name, isClosed(changed), tt.changed)
		}
		if b := w.Bundles()[partner]; !sameCerts(b.X509Authorities(), tt.want) {
			t.Errorf("%s: bundle has %d authorities, want %d", tt.name, len(b.X509Authorities()), len(tt.want))
		}
		if next != tt.next {
			t.Errorf("%s: next refresh in %s, want %s", tt.name, next, tt.next)
		}
	}

	// Restart with the endpoint down: the kept bundle, not the initial one.
	p.close()
	w2, err := New([]Source{spiffeSource(p.url, initial)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if b := w2.Bundles()[partner]; b == nil || !sameCerts(b.X509Authorities(), []*x509.Certificate{ca2.cert}) || sequence(b) != 4 {
		t.Fatalf("after restart: %+v, want the last good bundle", b)
	}
	w2.refresh(ctx, w2.files[0])
	if got := obs.last(); got != endpoint.ReasonUnreachable {
		t.Errorf("endpoint down: %q, want %q", got, endpoint.ReasonUnreachable)
	}
	if b := w2.Bundles()[partner]; !sameCerts(b.X509Authorities(), []*x509.Certificate{ca2.cert}) {
		t.Error("a failed fetch after restart lost the kept bundle")
	}
	// An initial bundle with a higher sequence number wins over the kept one.
	newer := writeInitial(t, ca1.bundle(partner, 9, 0))
	w3, err := New([]Source{spiffeSource(p.url, newer)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if b := w3.Bundles()[partner]; sequence(b) != 9 {
		t.Errorf("initial bundle with sequence 9 lost to the kept one: %d", sequence(b))
	}
}

// Every failure keeps the last good bundle, says why in the log and to the
// metric, and retries sooner, backing off.
func TestBundleEndpointFailuresKeepLastGood(t *testing.T) {
	ca, rogue := newTestCA(t, partner), newTestCA(t, partner)
	good := ca.bundle(partner, 5, time.Minute)
	otherCA := newTestCA(t, other)

	tests := []struct {
		name   string
		tls    *tls.Config // the server's; nil: the https_spiffe endpoint of ca
		status int
		body   []byte
		down   bool
		want   string
	}{
		{name: "endpoint down", down: true, want: endpoint.ReasonUnreachable},
		{name: "wrong server SPIFFE ID", tls: spiffeTLS(t, partner, ca.svid(t, spiffeid.RequireFromString("spiffe://partner.example/impostor"))), body: marshal(t, good), want: endpoint.ReasonServerIdentity},
		{name: "server SVID from another CA", tls: spiffeTLS(t, partner, rogue.svid(t, endpointID)), body: marshal(t, good), want: endpoint.ReasonServerIdentity},
		{name: "server SVID of another trust domain", tls: spiffeTLS(t, other, otherCA.svid(t, spiffeid.RequireFromString("spiffe://other.example/bundle-endpoint"))), body: marshal(t, good), want: endpoint.ReasonServerIdentity},
		{name: "bundle of another trust domain", body: marshal(t, otherCA.bundle(other, 6, 0)), want: ReasonTrustDomain},
		{name: "sequence going backwards", body: marshal(t, ca.bundle(partner, 4, 0)), want: ReasonSequence},
		{name: "huge", body: append(marshal(t, good)[:10], bytes.Repeat([]byte(" "), endpoint.DefaultMaxBundleSize)...), want: endpoint.ReasonTooLarge},
		{name: "malformed", body: []byte(`{"keys":[{"use":"x509-svid","kty":"EC"`), want: ReasonMalformed},
		{name: "no authorities", body: []byte(`{"keys":[],"spiffe_sequence":7}`), want: ReasonMalformed},
		{name: "not JSON", body: []byte("<html>maintenance</html>"), want: ReasonMalformed},
		{name: "server error", status: http.StatusServiceUnavailable, body: []byte("down"), want: endpoint.ReasonHTTPStatus},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := captureLog(t)
			cfg := tt.tls
			if cfg == nil {
				cfg = spiffeTLS(t, partner, ca.svid(t, endpointID))
			}
			p := startPeer(t, cfg)
			var obs observed
			w, err := New([]Source{spiffeSource(p.url, writeInitial(t, good))},
				Options{OwnTrustDomain: own, MinRefresh: time.Second, MaxRefresh: time.Hour, Observe: obs.observe})
			if err != nil {
				t.Fatal(err)
			}
			status := tt.status
			if status == 0 {
				status = http.StatusOK
			}
			p.set(status, tt.body)
			if tt.down {
				p.close()
			}
			changed := w.Changed()
			var retries []time.Duration
			for range 3 {
				retries = append(retries, w.refresh(context.Background(), w.files[0]))
			}
			if got := obs.last(); got != tt.want {
				t.Errorf("result %q, want %q", got, tt.want)
			}
			if isClosed(changed) {
				t.Error("Changed fired")
			}
			if b := w.Bundles()[partner]; b == nil || !b.Equal(good) {
				t.Errorf("bundle = %+v, want the last good one", b)
			}
			if n := w.Failing(); n != 1 {
				t.Errorf("Failing = %d, want 1", n)
			}
			if want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}; !slices.Equal(retries, want) {
				t.Errorf("retries in %v, want %v", retries, want)
			}
			line := `"Bundle endpoint refresh failed; keeping the last good bundle" err=`
			klog.Flush()
			if out := logs.String(); !strings.Contains(out, line) || !strings.Contains(out, `trust_domain="partner.example" reason="`+tt.want+`"`) {
				t.Errorf("no log line with the reason; log:\n%s", out)
			}

			// Once the endpoint serves a good bundle again, all is well.
			if tt.down {
				return
			}
			p.tls.Store(spiffeTLS(t, partner, ca.svid(t, endpointID)))
			p.set(http.StatusOK, marshal(t, ca.bundle(partner, 6, time.Minute)))
			if next := w.refresh(context.Background(), w.files[0]); next != time.Minute || obs.last() != ResultOK || w.Failing() != 0 {
				t.Errorf("recovery: next %s, result %q, failing %d", next, obs.last(), w.Failing())
			}
		})
	}
}

// https_web: the server's certificate verifies against the configured
// roots; without them (the system's roots) the test CA's does not.
func TestBundleEndpointHTTPSWeb(t *testing.T) {
	ca, webCA := newTestCA(t, partner), newTestCA(t, other)
	p := startPeer(t, webTLS(t, webCA))
	p.set(http.StatusOK, marshal(t, ca.bundle(partner, 1, 0)))
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: webCA.cert.Raw}))

	for _, tt := range []struct {
		name, caFile, want string
	}{
		{"configured roots", caFile, ResultOK},
		{"system roots", "", endpoint.ReasonServerIdentity},
	} {
		var obs observed
		w, err := New([]Source{{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: p.url, Profile: "https_web", CAFile: tt.caFile}}},
			Options{OwnTrustDomain: own, Observe: obs.observe})
		if err != nil {
			t.Fatal(err)
		}
		if len(w.Bundles()) != 0 {
			t.Fatalf("%s: a bundle before the first fetch", tt.name)
		}
		w.refresh(context.Background(), w.files[0])
		if got := obs.last(); got != tt.want {
			t.Errorf("%s: result %q, want %q", tt.name, got, tt.want)
		}
		if _, ok := w.Bundles()[partner]; ok != (tt.want == ResultOK) {
			t.Errorf("%s: bundle present %v", tt.name, ok)
		}
	}
}

// Run fetches at once and then by the hint, and stops with its context.
func TestBundleEndpointRun(t *testing.T) {
	ca1, ca2 := newTestCA(t, partner), newTestCA(t, partner)
	p := startPeer(t, spiffeTLS(t, partner, ca1.svid(t, endpointID)))
	p.set(http.StatusOK, marshal(t, ca1.bundle(partner, 2, 50*time.Millisecond)))
	w, err := New([]Source{spiffeSource(p.url, writeInitial(t, ca1.bundle(partner, 1, 0)))},
		Options{OwnTrustDomain: own, MinRefresh: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	for deadline := time.Now().Add(10 * time.Second); sequence(w.Bundles()[partner]) != 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Run never fetched")
		}
	}
	changed := w.Changed()
	p.set(http.StatusOK, marshal(t, ca2.bundle(partner, 3, 50*time.Millisecond)))
	waitClosed(t, changed, "the next refresh")
	if b := w.Bundles()[partner]; !sameCerts(b.X509Authorities(), []*x509.Certificate{ca2.cert}) {
		t.Errorf("bundle after refresh: %+v", b)
	}
}

func TestBundleEndpointConfigErrors(t *testing.T) {
	initial := writeInitial(t, newTestCA(t, partner).bundle(partner, 1, 0))
	tests := []struct {
		name string
		src  Source
		opts Options
		want string
	}{
		{"unknown profile", Source{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https"}}, Options{},
			`federation[0].bundleEndpoint.profile: unknown profile "https"`},
		{"https_spiffe without initial bundle", Source{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https_spiffe", SPIFFEID: endpointID.String()}}, Options{},
			`federation[0].path: https_spiffe needs an initial bundle`},
		{"https_spiffe without ID", Source{TrustDomain: "partner.example", Path: initial, BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https_spiffe"}}, Options{},
			`federation[0].bundleEndpoint.spiffeID: "": `},
		{"endpoint ID of another trust domain", Source{TrustDomain: "partner.example", Path: initial, BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https_spiffe", SPIFFEID: "spiffe://other.example/x"}}, Options{},
			`federation[0].bundleEndpoint.spiffeID: "spiffe://other.example/x" is not in partner.example`},
		{"plain http", Source{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: "http://127.0.0.1/", Profile: "https_web"}}, Options{},
			`federation[0].bundleEndpoint.url: "http://127.0.0.1/": want https://`},
		{"https_web with an ID", Source{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https_web", SPIFFEID: endpointID.String()}}, Options{},
			`federation[0].bundleEndpoint.spiffeID: only for https_spiffe`},
		{"caFile not PEM", Source{TrustDomain: "partner.example", BundleEndpoint: &Endpoint{URL: "https://127.0.0.1/", Profile: "https_web", CAFile: initial}}, Options{},
			`federation[0].bundleEndpoint.caFile: ` + initial + `: no PEM certificates`},
		{"bounds reversed", Source{TrustDomain: "partner.example", Path: initial}, Options{MinRefresh: time.Hour, MaxRefresh: time.Minute},
			`federation refresh: maximum 1m0s is below the minimum 1h0m0s`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.OwnTrustDomain = own
			_, err := New([]Source{tt.src}, tt.opts)
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("New error = %v, want prefix %q", err, tt.want)
			}
		})
	}
}
