// Package federation keeps the trust bundles of other trust domains, read
// from files (typically a mounted ConfigMap) and reloaded when they change,
// or fetched from their SPIFFE bundle endpoints and refreshed as their
// refresh hint says (endpoint.go).
package federation

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/internal/fsutil"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

// Bundle file formats.
const (
	// FormatSPIFFE is the SPIFFE bundle format (JWKS), holding X.509 and JWT
	// authorities.
	FormatSPIFFE = "spiffe"
	// FormatPEM is concatenated PEM certificates: X.509 authorities only.
	FormatPEM = "pem"
)

// DefaultPollInterval is how often files are checked when Options leaves it unset.
const DefaultPollInterval = 5 * time.Second

// maxBundleSize bounds what is read from a bundle file; a ConfigMap holds at
// most 1 MiB, so anything larger is a mistake, not a bundle.
const maxBundleSize = 4 << 20

// Source is where the bundle of one federated trust domain comes from: a
// file, or a bundle endpoint.
type Source struct {
	// TrustDomain is "example.org" or "spiffe://example.org".
	TrustDomain string `json:"trustDomain"`
	// Path is the bundle file. With BundleEndpoint it is the initial
	// bundle, read at start only; https_spiffe needs it, to authenticate
	// the endpoint the first time.
	Path string `json:"path,omitempty"`
	// Format is FormatSPIFFE (the default) or FormatPEM.
	Format string `json:"format,omitempty"`
	// BundleEndpoint, if set, is where the bundle is fetched from.
	BundleEndpoint *Endpoint `json:"bundleEndpoint,omitempty"`
}

// Options tune a Watcher.
type Options struct {
	// OwnTrustDomain is refused as a federated trust domain: our own bundle
	// comes from our CA, never from a file.
	OwnTrustDomain spiffeid.TrustDomain
	// PollInterval defaults to DefaultPollInterval.
	PollInterval time.Duration
	// Clock defaults to the real clock.
	Clock clock.Clock

	// StateDir keeps the last good bundle of each bundle endpoint, so that
	// a restart starts from it; empty: nothing is kept.
	StateDir string
	// MinRefresh and MaxRefresh bound how often a bundle endpoint is
	// fetched, whatever its refresh hint; they default to DefaultMinRefresh
	// and DefaultMaxRefresh.
	MinRefresh, MaxRefresh time.Duration
	// Observe, if set, is told the result of every bundle endpoint fetch:
	// ResultOK or the reason it failed (Reason*).
	Observe func(result string)
}

// Watcher serves the current bundles of the federated trust domains.
type Watcher struct {
	clock    clock.Clock
	interval time.Duration
	files    []*file // fixed by New, in configuration order

	stateDir               string
	minRefresh, maxRefresh time.Duration
	observe                func(string)

	mu      sync.Mutex
	changed chan struct{}
}

type file struct {
	index  int
	td     spiffeid.TrustDomain
	path   string
	format string

	// Touched only by the polling goroutine (and New before it).
	hash    [sha256.Size]byte // of the content last parsed, valid or not
	lastErr string            // last read error logged, so each is logged once

	remote *remote // set for a bundle endpoint, whose file is only the initial bundle

	// The last valid bundle (nil: none yet, a bundle endpoint not reached)
	// and, for a bundle endpoint, whether its last fetch failed. Guarded
	// by Watcher.mu.
	bundle  *spiffebundle.Bundle
	failing bool
}

// New checks the sources and loads every bundle. Errors name the offending
// field, e.g. "federation[1].path: ...".
func New(sources []Source, opts Options) (*Watcher, error) {
	w := &Watcher{
		clock:      opts.Clock,
		interval:   opts.PollInterval,
		stateDir:   opts.StateDir,
		minRefresh: opts.MinRefresh,
		maxRefresh: opts.MaxRefresh,
		observe:    opts.Observe,
		changed:    make(chan struct{}),
	}
	if err := w.checkRefreshBounds(); err != nil {
		return nil, err
	}
	if w.clock == nil {
		w.clock = clock.RealClock{}
	}
	if w.interval <= 0 {
		w.interval = DefaultPollInterval
	}
	seen := map[spiffeid.TrustDomain]int{}
	for i, src := range sources {
		f, err := newFile(i, src, opts.OwnTrustDomain)
		if err != nil {
			return nil, err
		}
		if j, dup := seen[f.td]; dup {
			return nil, fmt.Errorf("federation[%d].trustDomain: %q is already listed at federation[%d]", i, f.td.Name(), j)
		}
		seen[f.td] = i
		if src.BundleEndpoint != nil {
			if err := w.newRemote(f, *src.BundleEndpoint); err != nil {
				return nil, err
			}
			w.files = append(w.files, f)
			continue
		}
		data, err := fsutil.ReadFileLimited(f.path, maxBundleSize)
		if err != nil {
			return nil, fmt.Errorf("federation[%d].path: %w", i, err)
		}
		b, err := parse(f.td, f.format, data)
		if err != nil {
			return nil, fmt.Errorf("federation[%d].path: %s: %w", i, f.path, err)
		}
		f.hash = sha256.Sum256(data)
		f.bundle = b
		w.files = append(w.files, f)
	}
	return w, nil
}

func newFile(i int, src Source, own spiffeid.TrustDomain) (*file, error) {
	td, err := spiffeid.TrustDomainFromString(src.TrustDomain)
	if err == nil && src.TrustDomain != td.Name() && src.TrustDomain != td.IDString() {
		err = errors.New("want a trust domain name or spiffe://<name>, without a path")
	}
	if err != nil {
		return nil, fmt.Errorf("federation[%d].trustDomain: %q: %w", i, src.TrustDomain, err)
	}
	if td == own {
		return nil, fmt.Errorf("federation[%d].trustDomain: %q is our own trust domain", i, td.Name())
	}
	if src.Path == "" && src.BundleEndpoint == nil {
		return nil, fmt.Errorf("federation[%d].path: must not be empty", i)
	}
	format := src.Format
	switch format {
	case "":
		format = FormatSPIFFE
	case FormatSPIFFE, FormatPEM:
	default:
		return nil, fmt.Errorf("federation[%d].format: unknown format %q (want %q or %q)", i, src.Format, FormatSPIFFE, FormatPEM)
	}
	return &file{index: i, td: td, path: src.Path, format: format}, nil
}

// Bundles returns a snapshot of the current bundles, keyed by trust domain.
// The bundles are copies; changing them changes nothing here.
func (w *Watcher) Bundles() map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[spiffeid.TrustDomain]*spiffebundle.Bundle, len(w.files))
	for _, f := range w.files {
		if f.bundle != nil {
			out[f.td] = f.bundle.Clone()
		}
	}
	return out
}

// Changed returns a channel that is closed the next time a bundle changes;
// call it again afterwards for the next change.
func (w *Watcher) Changed() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changed
}

// Run polls the files and refreshes the bundle endpoints until ctx is done,
// then returns nil. Files are read through their path each time, so a
// ConfigMap's symlink swap is seen like any other change.
func (w *Watcher) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, f := range w.files {
		if f.remote != nil {
			wg.Go(func() { w.follow(ctx, f) })
		}
	}
	// A timer re-armed after each poll, so slow reads never pile up.
	timer := w.clock.NewTimer(w.interval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C():
			w.poll()
			timer.Reset(w.interval)
		}
	}
}

// poll reloads every file whose content changed and signals once if any
// bundle did.
func (w *Watcher) poll() {
	changed := false
	for _, f := range w.files {
		if f.remote == nil && w.reload(f) {
			changed = true
		}
	}
	if changed {
		w.mu.Lock()
		w.fireLocked()
		w.mu.Unlock()
	}
}

// fireLocked tells Changed's callers, and arms it for the next change.
func (w *Watcher) fireLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}

// reload reports whether f's bundle changed. A file that cannot be read or
// parsed keeps the previous bundle: a half-written or emptied file must not
// take trust away from a working federation.
func (w *Watcher) reload(f *file) bool {
	data, err := fsutil.ReadFileLimited(f.path, maxBundleSize)
	if err != nil {
		// Parse the content again once the file is back, even if unchanged.
		f.hash = [sha256.Size]byte{}
		if msg := err.Error(); msg != f.lastErr {
			f.lastErr = msg
			klog.ErrorS(err, "Cannot read federated bundle; keeping the previous bundle", "trust_domain", f.td, "source", fmt.Sprintf("federation[%d]", f.index))
		}
		return false
	}
	f.lastErr = ""
	sum := sha256.Sum256(data)
	if sum == f.hash {
		return false
	}
	f.hash = sum
	b, err := parse(f.td, f.format, data)
	if err != nil {
		klog.ErrorS(err, "Invalid federated bundle; keeping the previous bundle", "trust_domain", f.td, "path", f.path, "source", fmt.Sprintf("federation[%d]", f.index))
		return false
	}
	w.mu.Lock()
	same := f.bundle.Equal(b)
	f.bundle = b
	w.mu.Unlock()
	if same {
		return false
	}
	klog.InfoS("Federated bundle updated", "trust_domain", f.td, "path", f.path,
		"x509_authorities", len(b.X509Authorities()), "jwt_authorities", len(b.JWTAuthorities()))
	return true
}

func parse(td spiffeid.TrustDomain, format string, data []byte) (*spiffebundle.Bundle, error) {
	var b *spiffebundle.Bundle
	switch format {
	case FormatPEM:
		xb, err := x509bundle.Parse(td, data)
		if err != nil {
			return nil, err
		}
		b = spiffebundle.FromX509Bundle(xb)
	default:
		var err error
		if b, err = spiffebundle.Parse(td, data); err != nil {
			return nil, err
		}
	}
	if len(b.X509Authorities()) == 0 && len(b.JWTAuthorities()) == 0 {
		return nil, errors.New("bundle holds no X.509 or JWT authorities")
	}
	// The format does not name the trust domain, but a SPIFFE CA
	// certificate may: one of another trust domain is a mix-up (or a
	// mirror serving the wrong bundle), never a bundle of td.
	for _, c := range b.X509Authorities() {
		for _, u := range c.URIs {
			if id, err := spiffeid.FromURI(u); err == nil && id.TrustDomain() != td {
				return nil, fmt.Errorf("%w: an X.509 authority (serial %s) names %s", errOtherTrustDomain, c.SerialNumber, id.TrustDomain().IDString())
			}
		}
	}
	return b, nil
}

var errOtherTrustDomain = errors.New("bundle of another trust domain")
