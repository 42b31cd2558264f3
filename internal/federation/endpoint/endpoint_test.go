package endpoint

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	td = spiffeid.RequireTrustDomainFromString("csi.test")
	id = spiffeid.RequireFromString("spiffe://csi.test/bundle-endpoint")
)

type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T) ca {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return ca{cert, key}
}

func (c ca) leaf(t *testing.T, tmpl *x509.Certificate) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Minute), time.Now().Add(time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

// source is a bundle source the test changes, and an SVID source that
// counts its calls and mints a new SVID each time.
type source struct {
	t  *testing.T
	ca ca

	mu     sync.Mutex
	bundle *spiffebundle.Bundle
	minted int
}

func (s *source) Bundle() *spiffebundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundle.Clone()
}

func (s *source) set(b *spiffebundle.Bundle) {
	s.mu.Lock()
	s.bundle = b
	s.mu.Unlock()
}

func (s *source) X509SVID(_ context.Context, want spiffeid.ID, _ []string) (*x509svid.SVID, bool, error) {
	s.mu.Lock()
	s.minted++
	signer := s.ca
	s.mu.Unlock()
	cert, key := signer.leaf(s.t, &x509.Certificate{URIs: []*url.URL{want.URL()}})
	return &x509svid.SVID{ID: want, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, true, nil
}

func serve(t *testing.T, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "https://" + ln.Addr().String() + "/"
}

func fetch(t *testing.T, opts ClientOptions) *spiffebundle.Bundle {
	t.Helper()
	c, err := NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	data, err := c.Fetch(context.Background())
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	b, err := spiffebundle.Parse(td, data)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// https_spiffe: a fresh SVID at each connection, the bundle with its hint
// and a sequence that steps once per change, from the Unix time.
func TestServerHTTPSSPIFFE(t *testing.T) {
	c1, c2 := newCA(t), newCA(t)
	src := &source{t: t, ca: c1, bundle: spiffebundle.FromX509Authorities(td, []*x509.Certificate{c1.cert})}
	now := time.Unix(1_800_000_000, 0)
	s, err := NewServer(ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SVIDs: src, SPIFFEID: id, RefreshHint: 42 * time.Second, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	u := serve(t, s)
	opts := ClientOptions{URL: u, Profile: ProfileHTTPSSPIFFE, SPIFFEID: id, Bundle: src.Bundle().X509Bundle()}

	steps := []struct {
		name    string
		bundle  *spiffebundle.Bundle // nil: unchanged
		wantSeq uint64
	}{
		{"first", nil, 1_800_000_000},
		{"unchanged", nil, 1_800_000_000},
		{"an authority added", spiffebundle.FromX509Authorities(td, []*x509.Certificate{c1.cert, c2.cert}), 1_800_000_001},
		{"the source's own sequence", func() *spiffebundle.Bundle {
			b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{c1.cert, c2.cert})
			b.SetSequenceNumber(7)
			return b
		}(), 7},
	}
	for _, st := range steps {
		if st.bundle != nil {
			src.set(st.bundle)
		}
		b := fetch(t, opts)
		if seq, _ := b.SequenceNumber(); seq != st.wantSeq {
			t.Errorf("%s: sequence %d, want %d", st.name, seq, st.wantSeq)
		}
		if hint, _ := b.RefreshHint(); hint != 42*time.Second {
			t.Errorf("%s: refresh hint %s", st.name, hint)
		}
		if want := src.Bundle(); !sameAuthorities(b, want) {
			t.Errorf("%s: served authorities differ from the source's", st.name)
		}
	}
	if src.minted != len(steps) {
		t.Errorf("SVID asked for %d times, want once per connection (%d)", src.minted, len(steps))
	}

	// A restart an hour later goes on upwards without any state.
	now = now.Add(time.Hour)
	src.mu.Lock()
	src.ca = c2
	src.mu.Unlock()
	src.set(spiffebundle.FromX509Authorities(td, []*x509.Certificate{c2.cert}))
	s2, err := NewServer(ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SVIDs: src, SPIFFEID: id, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	b := fetch(t, ClientOptions{URL: serve(t, s2), Profile: ProfileHTTPSSPIFFE, SPIFFEID: id, Bundle: src.Bundle().X509Bundle()})
	if seq, _ := b.SequenceNumber(); seq != 1_800_003_600 {
		t.Errorf("after restart: sequence %d", seq)
	}
	if hint, _ := b.RefreshHint(); hint != DefaultRefreshHint {
		t.Errorf("default refresh hint %s", hint)
	}

	// Only GET and HEAD.
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", rec.Code)
	}
}

func sameAuthorities(a, b *spiffebundle.Bundle) bool {
	x, y := a.X509Authorities(), b.X509Authorities()
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if !x[i].Equal(y[i]) {
			return false
		}
	}
	return true
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// https_web: the configured certificate, read again when the files change,
// the previous one kept while they are broken.
func TestServerHTTPSWeb(t *testing.T) {
	webCA := newCA(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	issue := func() *x509.Certificate {
		cert, key := webCA.leaf(t, &x509.Certificate{IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}})
		kd, _ := x509.MarshalPKCS8PrivateKey(key)
		writePEM(t, keyFile, "PRIVATE KEY", kd)
		writePEM(t, certFile, "CERTIFICATE", cert.Raw)
		return cert
	}
	first := issue()
	src := &source{t: t, ca: webCA, bundle: spiffebundle.FromX509Authorities(td, []*x509.Certificate{newCA(t).cert})}
	s, err := NewServer(ServerOptions{Bundle: src, Profile: ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	u := serve(t, s)
	roots := x509.NewCertPool()
	roots.AddCert(webCA.cert)
	served := func() *x509.Certificate {
		t.Helper()
		conn, err := tls.Dial("tcp", u[len("https://"):len(u)-1], &tls.Config{RootCAs: roots})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	if !served().Equal(first) {
		t.Fatal("not the configured certificate")
	}
	fetch(t, ClientOptions{URL: u, Profile: ProfileHTTPSWeb, Roots: roots})

	// A renewal, with a later modification time.
	time.Sleep(10 * time.Millisecond)
	second := issue()
	if !served().Equal(second) {
		t.Error("the renewed certificate is not served")
	}
	if err := os.WriteFile(certFile, []byte("half written"), 0o600); err != nil {
		t.Fatal(err)
	}
	if !served().Equal(second) {
		t.Error("a broken certificate file replaced the working certificate")
	}
}

func TestNewServerErrors(t *testing.T) {
	src := &source{bundle: spiffebundle.New(td)}
	for _, tt := range []struct {
		name string
		opts ServerOptions
	}{
		{"no bundle", ServerOptions{Profile: ProfileHTTPSWeb}},
		{"unknown profile", ServerOptions{Bundle: src, Profile: "http"}},
		{"https_spiffe without SVIDs", ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SPIFFEID: id}},
		{"https_spiffe without ID", ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SVIDs: src}},
		{"https_web without files", ServerOptions{Bundle: src, Profile: ProfileHTTPSWeb}},
		{"https_web missing files", ServerOptions{Bundle: src, Profile: ProfileHTTPSWeb, CertFile: "/nonexistent/c", KeyFile: "/nonexistent/k"}},
	} {
		if _, err := NewServer(tt.opts); err == nil {
			t.Errorf("%s: NewServer succeeded", tt.name)
		}
	}
}

// MaxConnections bounds the connections served at once: past it a peer
// waits, and a slot frees as soon as a connection ends. Each answer ends
// its connection, so a peer's idle keep-alive holds no slot.
func TestServerConnectionLimit(t *testing.T) {
	c1 := newCA(t)
	src := &source{t: t, ca: c1, bundle: spiffebundle.FromX509Authorities(td, []*x509.Certificate{c1.cert})}
	s, err := NewServer(ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SVIDs: src, SPIFFEID: id, MaxConnections: 2})
	if err != nil {
		t.Fatal(err)
	}
	u := serve(t, s)
	addr := u[len("https://") : len(u)-1]
	// The bundle is public: a plain HTTPS client will do. It keeps its
	// connection for the next request unless the server ends it.
	keepAlive := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	get := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		resp, err := keepAlive.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	// served reports whether a TLS handshake completes within wait.
	served := func(wait time.Duration) bool {
		d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	if err := get(); err != nil {
		t.Fatalf("first fetch: %v", err)
	}
	// Two connections that never say anything take both slots (the
	// keep-alive client's first one is closed by the server).
	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
		t.Cleanup(func() { c.Close() })
	}
	if served(500 * time.Millisecond) {
		t.Fatal("served a third connection with both slots held")
	}
	idle[0].Close()
	// Had the server kept the first fetch's connection, the second idle
	// one would take this slot.
	if !served(5 * time.Second) {
		t.Fatal("no slot free once one of two idle connections closed: the first fetch's connection still holds one")
	}
	if err := get(); err != nil {
		t.Fatalf("fetch once a slot is free: %v", err)
	}
	// One slot left: fetches one after the other all get through, as each
	// answer frees the slot.
	for i := range 3 {
		if err := get(); err != nil {
			t.Fatalf("fetch %d with one slot: %v", i, err)
		}
	}
	if _, err := NewServer(ServerOptions{Bundle: src, Profile: ProfileHTTPSSPIFFE, SVIDs: src, SPIFFEID: id, MaxConnections: -1}); err == nil {
		t.Error("NewServer took a negative MaxConnections")
	}
}
