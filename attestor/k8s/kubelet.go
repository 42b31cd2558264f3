package k8s

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
)

// PodLister fetches the kubelet's pod list: the raw JSON body of GET /pods
// (a v1.PodList). *KubeletClient implements it; tests substitute their own.
type PodLister interface {
	ListPods(ctx context.Context) ([]byte, error)
}

const (
	// A node's pod list is a few MB at most; anything far larger is not a kubelet.
	maxPodListBytes = 256 << 20
)

// KubeletConfig says how to reach the local kubelet.
type KubeletConfig struct {
	// NodeName is the name the kubelet's serving certificate is checked
	// against when Host is an IP address.
	NodeName string
	// Host to dial (required), such as 127.0.0.1: the agent runs with the
	// host network. A DNS name here is also the name the serving certificate
	// must carry.
	Host string
	// Port is the secure port.
	Port int
	// ReadOnlyPort, when > 0, selects the kubelet's unauthenticated plain-HTTP
	// port instead of the secure one. It takes no credentials or TLS options.
	ReadOnlyPort int
	// TokenFile holds the bearer token; it is read on every request, so a
	// rotated token is used at once.
	TokenFile string
	// CAFile verifies the kubelet's serving certificate; empty: system roots.
	// Re-read when it changes. A kubelet's self-signed certificate file
	// (<root-dir>/pki/kubelet.crt: the certificate and the CA that made it)
	// also works here and pins that one kubelet.
	CAFile string
	// ClientCertFile and ClientKeyFile (PEM) authenticate the agent by
	// certificate. Re-read when either changes.
	ClientCertFile, ClientKeyFile string
	// InsecureSkipVerify skips verification of the serving certificate. It
	// must be asked for explicitly and excludes CAFile.
	InsecureSkipVerify bool
	// SendTokenUnverified allows the bearer token to go to a kubelet whose
	// certificate is not verified (InsecureSkipVerify). Without it that
	// combination is refused: whatever binds the kubelet's port while the
	// kubelet is down would receive a token that can read the node's pods.
	// A client certificate needs no such opt-in: TLS proves possession of
	// its key without handing the key over.
	SendTokenUnverified bool
	// Anonymous sends no credentials at all.
	Anonymous bool
	// Timeout bounds one request, connection included.
	Timeout time.Duration
	// Observe, if set, is told of every pod list request: its error and
	// how long it took (metrics).
	Observe func(err error, d time.Duration)
}

// KubeletClient lists the pods of the local kubelet.
type KubeletClient struct {
	url        string
	nodeName   string
	serverName string
	tokenFile  string
	transport  *http.Transport
	client     *http.Client
	observe    func(err error, d time.Duration)

	ca   *reloading[*x509.CertPool]   // nil: system roots
	cert *reloading[*tls.Certificate] // nil: no client certificate
}

// NewKubeletClient checks cfg and loads its credentials once, so that a
// missing or broken file is reported at start rather than on first use.
func NewKubeletClient(cfg KubeletConfig) (*KubeletClient, error) {
	switch {
	case cfg.Host == "":
		return nil, errors.New("kubelet host is required")
	case cfg.ReadOnlyPort == 0 && (cfg.Port < 1 || cfg.Port > 65535):
		return nil, fmt.Errorf("kubelet port %d out of range", cfg.Port)
	case cfg.ReadOnlyPort < 0 || cfg.ReadOnlyPort > 65535:
		return nil, fmt.Errorf("kubelet read-only port %d out of range", cfg.ReadOnlyPort)
	case cfg.Timeout <= 0:
		return nil, fmt.Errorf("kubelet timeout %v is not positive", cfg.Timeout)
	case (cfg.ClientCertFile == "") != (cfg.ClientKeyFile == ""):
		return nil, errors.New("kubelet client certificate and key must be given together")
	case cfg.InsecureSkipVerify && cfg.CAFile != "":
		return nil, errors.New("kubelet CA file and skip-verify exclude each other")
	case cfg.SendTokenUnverified && !cfg.InsecureSkipVerify:
		return nil, errors.New("sending the kubelet token unverified only applies with skip-verify")
	case cfg.InsecureSkipVerify && cfg.TokenFile != "" && !cfg.SendTokenUnverified:
		return nil, errors.New("kubelet skip-verify would send the token to whatever listens on the kubelet port: " +
			"verify the serving certificate with a CA file, use a client certificate, or allow it explicitly")
	case cfg.Anonymous && (cfg.TokenFile != "" || cfg.ClientCertFile != ""):
		return nil, errors.New("anonymous kubelet access excludes a token file and a client certificate")
	case cfg.ReadOnlyPort > 0 && (cfg.TokenFile != "" || cfg.ClientCertFile != "" || cfg.CAFile != "" || cfg.InsecureSkipVerify || cfg.SendTokenUnverified):
		return nil, errors.New("the kubelet read-only port is plain HTTP and takes no credentials or TLS options")
	}

	c := &KubeletClient{nodeName: cfg.NodeName, observe: cfg.Observe}
	c.transport = &http.Transport{
		Proxy:                 nil, // the kubelet is local; never send its token through a proxy
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		MaxIdleConns:          2,
		MaxIdleConnsPerHost:   2,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: cfg.Timeout,
	}
	c.client = &http.Client{
		Transport: c.transport,
		Timeout:   cfg.Timeout,
		// The kubelet does not redirect; following one could carry the token elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	if cfg.ReadOnlyPort > 0 {
		c.url = "http://" + net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.ReadOnlyPort)) + "/pods"
		return c, nil
	}
	c.url = "https://" + net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)) + "/pods"

	// Dialing an address: the certificate is checked against the node name,
	// which is what the kubelet's serving certificate is issued for.
	c.serverName = cfg.Host
	if net.ParseIP(cfg.Host) != nil && cfg.NodeName != "" {
		c.serverName = cfg.NodeName
	}

	if !cfg.Anonymous && cfg.TokenFile == "" && cfg.ClientCertFile == "" {
		return nil, errors.New("kubelet access needs a token file, a client certificate, or anonymous access")
	}
	c.tokenFile = cfg.TokenFile
	if c.tokenFile != "" {
		if _, err := readToken(c.tokenFile); err != nil {
			return nil, err
		}
	}
	if cfg.CAFile != "" {
		c.ca = newReloading([]string{cfg.CAFile}, parseCAPool)
		if _, _, err := c.ca.get(); err != nil {
			return nil, fmt.Errorf("kubelet CA: %w", err)
		}
	}
	if cfg.ClientCertFile != "" {
		c.cert = newReloading([]string{cfg.ClientCertFile, cfg.ClientKeyFile}, parseKeyPair)
		if _, _, err := c.cert.get(); err != nil {
			return nil, fmt.Errorf("kubelet client certificate: %w", err)
		}
	}

	tlsConfig := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: c.serverName,
		// Verification is done in verifyServer against the CA as it is now,
		// so a rotated CA file takes effect without a restart.
		InsecureSkipVerify: true, // verified in VerifyConnection, unless skip-verify was asked for
	}
	if cfg.InsecureSkipVerify {
		// Loud on purpose: this is an explicit opt-in, not a default.
		klog.InfoS("WARNING: the kubelet's serving certificate is not verified; credentials go to whatever listens on its port",
			"url", c.url, "token_sent", c.tokenFile != "")
	} else {
		tlsConfig.VerifyConnection = c.verifyServer
	}
	if c.cert != nil {
		tlsConfig.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _, err := c.cert.get()
			return cert, err
		}
	}
	c.transport.TLSClientConfig = tlsConfig
	return c, nil
}

// NodeName is the node name in use: from the config or the environment.
func (c *KubeletClient) NodeName() string { return c.nodeName }

// URL is the address the pod list is fetched from.
func (c *KubeletClient) URL() string { return c.url }

// Close drops idle connections.
func (c *KubeletClient) Close() { c.transport.CloseIdleConnections() }

// ListPods fetches GET /pods. Every error wraps attestor.ErrUnavailable.
func (c *KubeletClient) ListPods(ctx context.Context) ([]byte, error) {
	start := time.Now()
	body, err := c.listPods(ctx)
	if c.observe != nil {
		c.observe(err, time.Since(start))
	}
	if err != nil {
		return nil, fmt.Errorf("%w: kubelet %s: %w", attestor.ErrUnavailable, c.url, err)
	}
	return body, nil
}

func (c *KubeletClient) listPods(ctx context.Context) ([]byte, error) {
	// A rotated certificate or CA applies to new connections only; drop the
	// idle ones so the next request handshakes with what is on disk now.
	rotated := false
	if c.ca != nil {
		changed, err := c.ca.changed()
		if err != nil {
			return nil, fmt.Errorf("kubelet CA: %w", err)
		}
		rotated = rotated || changed
	}
	if c.cert != nil {
		changed, err := c.cert.changed()
		if err != nil {
			return nil, fmt.Errorf("kubelet client certificate: %w", err)
		}
		rotated = rotated || changed
	}
	if rotated {
		c.transport.CloseIdleConnections()
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	if c.tokenFile != "" {
		token, err := readToken(c.tokenFile)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
		return nil, fmt.Errorf("GET /pods: %s: %q", resp.Status, bytes.TrimSpace(snippet))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPodListBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read pod list: %w", err)
	}
	if len(body) > maxPodListBytes {
		return nil, fmt.Errorf("pod list larger than %d bytes", maxPodListBytes)
	}
	return body, nil
}

func (c *KubeletClient) verifyServer(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("kubelet presented no certificate")
	}
	opts := x509.VerifyOptions{
		DNSName:       c.serverName,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if c.ca != nil {
		pool, _, err := c.ca.get()
		if err != nil {
			return err
		}
		opts.Roots = pool
	}
	for _, cert := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(cert)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return fmt.Errorf("verify kubelet certificate for %q: %w", c.serverName, err)
	}
	return nil
}

func readToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read token file: %w", err)
	}
	token := string(bytes.TrimSpace(data))
	if token == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return token, nil
}

func parseCAPool(contents [][]byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(contents[0]) {
		return nil, errors.New("no PEM certificate in CA file")
	}
	return pool, nil
}

func parseKeyPair(contents [][]byte) (*tls.Certificate, error) {
	cert, err := tls.X509KeyPair(contents[0], contents[1])
	if err != nil {
		return nil, err
	}
	return &cert, nil
}

// reloading holds a value parsed from files and parses them again when any
// of them changes on disk (rotation by rewrite or by symlink swap).
type reloading[T any] struct {
	paths []string
	parse func([][]byte) (T, error)

	mu     sync.Mutex
	stamps []fileStamp
	val    T
	loaded bool
}

type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime syscall.Timespec
}

func newReloading[T any](paths []string, parse func([][]byte) (T, error)) *reloading[T] {
	return &reloading[T]{paths: paths, parse: parse}
}

// changed reloads when needed and reports whether the value was replaced.
func (r *reloading[T]) changed() (bool, error) {
	_, changed, err := r.get()
	return changed, err
}

// get returns the current value. When the files changed but no longer parse
// (a rotation caught half way: new certificate, old key), the previous value
// is kept and the files are tried again next time.
func (r *reloading[T]) get() (T, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamps := make([]fileStamp, len(r.paths))
	for i, p := range r.paths {
		st, err := os.Stat(p)
		if err != nil {
			return r.keepOrFail(fmt.Errorf("stat %s: %w", p, err))
		}
		sys, _ := st.Sys().(*syscall.Stat_t)
		if sys == nil {
			return r.keepOrFail(fmt.Errorf("stat %s: no inode data", p))
		}
		stamps[i] = fileStamp{dev: sys.Dev, ino: sys.Ino, size: sys.Size, mtime: sys.Mtim, ctime: sys.Ctim}
	}
	if r.loaded && equalStamps(stamps, r.stamps) {
		return r.val, false, nil
	}
	contents := make([][]byte, len(r.paths))
	for i, p := range r.paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return r.keepOrFail(fmt.Errorf("read %s: %w", p, err))
		}
		contents[i] = data
	}
	val, err := r.parse(contents)
	if err != nil {
		return r.keepOrFail(fmt.Errorf("parse %v: %w", r.paths, err))
	}
	r.val, r.stamps, r.loaded = val, stamps, true
	return val, true, nil
}

func (r *reloading[T]) keepOrFail(err error) (T, bool, error) {
	if !r.loaded {
		var zero T
		return zero, false, err
	}
	klog.ErrorS(err, "Keeping previous kubelet credentials", "files", r.paths)
	return r.val, false, nil
}

func equalStamps(a, b []fileStamp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
