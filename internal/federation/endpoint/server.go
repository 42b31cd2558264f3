package endpoint

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/netutil"
	"k8s.io/klog/v2"
)

// DefaultRefreshHint is the spiffe_refresh_hint served when ServerOptions
// leaves it unset; SPIRE's default too.
const DefaultRefreshHint = 5 * time.Minute

// BundleSource supplies the bundle to serve: the agent's CA, or the
// cluster controller's trust. A bundle that carries a sequence number is
// served with it; otherwise the Server numbers changes itself.
type BundleSource interface {
	Bundle() *spiffebundle.Bundle
}

// SVIDSource mints the endpoint's X.509-SVID (https_spiffe); it is asked at
// every TLS handshake, so a cache that renews ahead of expiry rotates it.
type SVIDSource interface {
	X509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (svid *x509svid.SVID, minted bool, err error)
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Bundle  BundleSource
	Profile string // ProfileHTTPSWeb or ProfileHTTPSSPIFFE
	// SVIDs and SPIFFEID (https_spiffe): the endpoint's identity, in the
	// served trust domain.
	SVIDs    SVIDSource
	SPIFFEID spiffeid.ID
	// CertFile and KeyFile (https_web): the serving certificate chain and
	// key, PEM; read again when they change (cert-manager renewals).
	CertFile, KeyFile string
	// RefreshHint defaults to DefaultRefreshHint.
	RefreshHint time.Duration
	// MaxConnections bounds the connections served at once (0: no bound;
	// internal/config always sets one): the endpoint faces other trust
	// domains, maybe the internet, and each connection costs a TLS state.
	MaxConnections int
	// Now defaults to time.Now.
	Now func() time.Time
}

// Server serves one trust domain's bundle at every path.
type Server struct {
	bundle  BundleSource
	profile string
	svids   SVIDSource
	id      spiffeid.ID
	cert    *certFiles
	hint    time.Duration
	conns   int
	now     func() time.Time

	mu      sync.Mutex
	last    *spiffebundle.Bundle // authorities last served, no sequence or hint
	lastSeq uint64
}

// NewServer checks opts; https_web reads the certificate files at once.
func NewServer(opts ServerOptions) (*Server, error) {
	s := &Server{bundle: opts.Bundle, profile: opts.Profile, svids: opts.SVIDs, id: opts.SPIFFEID, hint: opts.RefreshHint,
		conns: opts.MaxConnections, now: opts.Now}
	if s.bundle == nil {
		return nil, errors.New("bundle endpoint: a bundle source is required")
	}
	if s.conns < 0 {
		return nil, fmt.Errorf("bundle endpoint: MaxConnections %d is negative", s.conns)
	}
	if s.hint <= 0 {
		s.hint = DefaultRefreshHint
	}
	if s.now == nil {
		s.now = time.Now
	}
	switch s.profile {
	case ProfileHTTPSSPIFFE:
		if s.svids == nil || s.id.IsZero() {
			return nil, errors.New("bundle endpoint: https_spiffe needs an SVID source and the endpoint's SPIFFE ID")
		}
	case ProfileHTTPSWeb:
		c, err := loadCertFiles(opts.CertFile, opts.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("bundle endpoint: %w", err)
		}
		s.cert = c
	default:
		return nil, fmt.Errorf("bundle endpoint: unknown profile %q (want %s or %s)", s.profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	return s, nil
}

// TLSConfig is the endpoint's server side of TLS: the SVID or the
// configured certificate, no client certificates (the bundle is public).
func (s *Server) TLSConfig() *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
	if s.profile == ProfileHTTPSSPIFFE {
		cfg.GetCertificate = s.svidCertificate
	} else {
		cfg.GetCertificate = s.cert.get
	}
	return cfg
}

func (s *Server) svidCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	svid, _, err := s.svids.X509SVID(hello.Context(), s.id, nil)
	if err != nil {
		klog.ErrorS(err, "Bundle endpoint: cannot mint its X.509-SVID", "spiffe_id", s.id.String())
		return nil, fmt.Errorf("mint the endpoint's X.509-SVID: %w", err)
	}
	c := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, cert := range svid.Certificates {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	return c, nil
}

// ServeHTTP answers GET with the bundle document.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	data, err := s.Document()
	if err != nil {
		klog.ErrorS(err, "Bundle endpoint: cannot marshal the bundle")
		http.Error(w, "bundle unavailable", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(data)
}

// Document is the bundle as served: authorities, spiffe_refresh_hint and
// spiffe_sequence.
func (s *Server) Document() ([]byte, error) {
	b := s.bundle.Bundle()
	if b == nil {
		return nil, errors.New("no bundle")
	}
	b.SetRefreshHint(s.hint)
	if _, ok := b.SequenceNumber(); !ok {
		b.SetSequenceNumber(s.sequence(b))
	}
	return b.Marshal()
}

// sequence numbers the bundle's changes. It starts from the Unix time and
// steps by one per change, so it still grows across restarts without any
// state, as long as the bundle changes less than once a second on average
// (CA rotations come hours apart).
func (s *Server) sequence(b *spiffebundle.Bundle) uint64 {
	content := spiffebundle.New(b.TrustDomain())
	content.SetX509Authorities(b.X509Authorities())
	content.SetJWTAuthorities(b.JWTAuthorities())
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last == nil || !s.last.Equal(content) {
		s.lastSeq = max(s.lastSeq+1, uint64(max(s.now().Unix(), 1)))
		s.last = content
	}
	return s.lastSeq
}

// Serve serves HTTPS on ln until ctx is done, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s,
		TLSConfig:         s.TLSConfig(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
	// A peer fetches once per refresh hint: nothing to keep open between,
	// and a connection closed after its answer frees its slot at once.
	hs.SetKeepAlivesEnabled(false)
	if s.conns > 0 {
		ln = netutil.LimitListener(ln, s.conns)
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(tls.NewListener(ln, hs.TLSConfig)) }()
	klog.InfoS("Bundle endpoint serving", "addr", ln.Addr().String(), "profile", s.profile)
	select {
	case err := <-errc:
		return fmt.Errorf("bundle endpoint: %w", err)
	case <-ctx.Done():
	}
	stop, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := hs.Shutdown(stop); err != nil {
		hs.Close()
	}
	return nil
}

// certFiles holds the https_web serving certificate, read again when
// either file changes; a bad update keeps the previous certificate.
type certFiles struct {
	certFile, keyFile string

	mu       sync.Mutex
	cert     *tls.Certificate
	certStat fileStamp
	keyStat  fileStamp
}

type fileStamp struct {
	mod  time.Time
	size int64
}

func stamp(path string) (fileStamp, error) {
	st, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{mod: st.ModTime(), size: st.Size()}, nil
}

func loadCertFiles(certFile, keyFile string) (*certFiles, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("https_web needs a certificate file and a key file")
	}
	c := &certFiles{certFile: certFile, keyFile: keyFile}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *certFiles) reload() error {
	cs, err := stamp(c.certFile)
	if err != nil {
		return err
	}
	ks, err := stamp(c.keyFile)
	if err != nil {
		return err
	}
	if c.cert != nil && cs == c.certStat && ks == c.keyStat {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("serving certificate %s, key %s: %w", c.certFile, c.keyFile, err)
	}
	if c.cert != nil {
		klog.InfoS("Bundle endpoint: serving certificate reloaded", "path", c.certFile)
	}
	c.cert, c.certStat, c.keyStat = &cert, cs, ks
	return nil
}

func (c *certFiles) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.reload(); err != nil {
		// Half-written files during a renewal: keep serving the last pair.
		klog.ErrorS(err, "Bundle endpoint: cannot reload the serving certificate; keeping the previous one", "path", c.certFile)
	}
	return c.cert, nil
}
