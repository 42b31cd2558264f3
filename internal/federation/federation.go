// Package federation keeps the trust bundles of other trust domains, read
// from files (typically a mounted ConfigMap) and reloaded when they change.
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

// Source is the bundle file of one federated trust domain.
type Source struct {
	// TrustDomain is "example.org" or "spiffe://example.org".
	TrustDomain string `json:"trustDomain"`
	Path        string `json:"path"`
	// Format is FormatSPIFFE (the default) or FormatPEM.
	Format string `json:"format,omitempty"`
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
}

// Watcher serves the current bundles of the federated trust domains.
type Watcher struct {
	clock    clock.Clock
	interval time.Duration
	files    []*file // fixed by New, in configuration order

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

	bundle *spiffebundle.Bundle // last valid bundle; guarded by Watcher.mu
}

// New checks the sources and loads every bundle. Errors name the offending
// field, e.g. "federation[1].path: ...".
func New(sources []Source, opts Options) (*Watcher, error) {
	w := &Watcher{
		clock:    opts.Clock,
		interval: opts.PollInterval,
		changed:  make(chan struct{}),
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
	if src.Path == "" {
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
		out[f.td] = f.bundle.Clone()
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

// Run polls the files until ctx is done, then returns nil. Files are read
// through their path each time, so a ConfigMap's symlink swap is seen like
// any other change.
func (w *Watcher) Run(ctx context.Context) error {
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
		if w.reload(f) {
			changed = true
		}
	}
	if changed {
		w.mu.Lock()
		close(w.changed)
		w.changed = make(chan struct{})
		w.mu.Unlock()
	}
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
	return b, nil
}
