package federation

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
	"github.com/csi-agent/csi-agent/internal/fsutil"
)

// Endpoint is a trust domain's SPIFFE bundle endpoint.
type Endpoint struct {
	// URL is https://host[:port]/path.
	URL string `json:"url"`
	// Profile is "https_spiffe" or "https_web".
	Profile string `json:"profile"`
	// SPIFFEID (https_spiffe) is the endpoint server's SPIFFE ID, in the
	// federated trust domain, e.g. spiffe://example.org/spire/server.
	SPIFFEID string `json:"spiffeID,omitempty"`
	// CAFile (https_web) holds the PEM roots that verify the server's
	// certificate; empty: the system's roots.
	CAFile string `json:"caFile,omitempty"`
}

// Bundle endpoint refresh bounds and the interval used when a bundle has no
// refresh hint.
const (
	DefaultMinRefresh = 30 * time.Second
	DefaultMaxRefresh = time.Hour
	DefaultRefresh    = 5 * time.Minute
)

// The results of a bundle endpoint fetch, told to Options.Observe: ResultOK,
// a reason of endpoint (unreachable, server_identity, http_status,
// too_large) or one of these.
const (
	ResultOK = "ok"
	// ReasonMalformed: not a SPIFFE bundle, or one without authorities.
	ReasonMalformed = "malformed"
	// ReasonTrustDomain: an authority names another trust domain.
	ReasonTrustDomain = "trust_domain"
	// ReasonSequence: spiffe_sequence is lower than the last good bundle's.
	ReasonSequence = "sequence_backwards"
)

// remote is what a bundle endpoint source needs beyond a file's.
type remote struct {
	client    *endpoint.Client
	url       string
	statePath string // the last good bundle, or "" when not kept
	failures  int    // consecutive; touched only by follow
}

func (w *Watcher) checkRefreshBounds() error {
	if w.minRefresh <= 0 {
		w.minRefresh = DefaultMinRefresh
	}
	if w.maxRefresh <= 0 {
		w.maxRefresh = DefaultMaxRefresh
	}
	if w.maxRefresh < w.minRefresh {
		return fmt.Errorf("federation refresh: maximum %s is below the minimum %s", w.maxRefresh, w.minRefresh)
	}
	return nil
}

// newRemote checks ep and loads f's first bundle: the one kept from the last
// run or the initial file, whichever has the higher sequence number.
func (w *Watcher) newRemote(f *file, ep Endpoint) error {
	place := fmt.Sprintf("federation[%d].bundleEndpoint", f.index)
	opts := endpoint.ClientOptions{URL: ep.URL, Profile: ep.Profile}
	switch ep.Profile {
	case endpoint.ProfileHTTPSSPIFFE:
		id, err := spiffeid.FromString(ep.SPIFFEID)
		if err != nil {
			return fmt.Errorf("%s.spiffeID: %q: %w", place, ep.SPIFFEID, err)
		}
		if id.TrustDomain() != f.td {
			return fmt.Errorf("%s.spiffeID: %q is not in %s, whose bundle authenticates the endpoint", place, ep.SPIFFEID, f.td.Name())
		}
		if f.path == "" {
			return fmt.Errorf("federation[%d].path: https_spiffe needs an initial bundle to authenticate the endpoint the first time", f.index)
		}
		opts.SPIFFEID, opts.Bundle = id, lastGood{w: w, f: f}
	case endpoint.ProfileHTTPSWeb:
		if ep.SPIFFEID != "" {
			return fmt.Errorf("%s.spiffeID: only for https_spiffe", place)
		}
		if ep.CAFile != "" {
			data, err := fsutil.ReadFileLimited(ep.CAFile, maxBundleSize)
			if err != nil {
				return fmt.Errorf("%s.caFile: %w", place, err)
			}
			opts.Roots = x509.NewCertPool()
			if !opts.Roots.AppendCertsFromPEM(data) {
				return fmt.Errorf("%s.caFile: %s: no PEM certificates", place, ep.CAFile)
			}
		}
	default:
		return fmt.Errorf("%s.profile: unknown profile %q (want %s or %s)", place, ep.Profile, endpoint.ProfileHTTPSSPIFFE, endpoint.ProfileHTTPSWeb)
	}
	if ep.Profile == endpoint.ProfileHTTPSSPIFFE && ep.CAFile != "" {
		return fmt.Errorf("%s.caFile: only for https_web", place)
	}
	client, err := endpoint.NewClient(opts)
	if err != nil {
		return fmt.Errorf("%s.%w", place, err)
	}
	f.remote = &remote{client: client, url: ep.URL}
	if w.stateDir != "" {
		dir := filepath.Join(w.stateDir, "federation")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("federation state: %w", err)
		}
		f.remote.statePath = filepath.Join(dir, f.td.Name()+".json")
	}

	kept := f.remote.loadKept(f.td)
	var initial *spiffebundle.Bundle
	if f.path != "" {
		data, err := fsutil.ReadFileLimited(f.path, maxBundleSize)
		if err == nil {
			initial, err = parse(f.td, f.format, data)
		}
		if err != nil {
			if kept == nil {
				return fmt.Errorf("federation[%d].path: %s: %w", f.index, f.path, err)
			}
			klog.ErrorS(err, "Cannot read the initial federated bundle; starting from the one kept", "trust_domain", f.td.Name(), "path", f.path)
		}
	}
	f.bundle = kept
	if kept == nil || initial != nil && sequence(initial) > sequence(kept) {
		f.bundle = initial
	}
	return nil
}

// loadKept reads the bundle kept from the last run; a missing or damaged
// file is no bundle.
func (r *remote) loadKept(td spiffeid.TrustDomain) *spiffebundle.Bundle {
	if r.statePath == "" {
		return nil
	}
	data, err := fsutil.ReadFileLimited(r.statePath, maxBundleSize)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var b *spiffebundle.Bundle
	if err == nil {
		b, err = parse(td, FormatSPIFFE, data)
	}
	if err != nil {
		klog.ErrorS(err, "Ignoring the federated bundle kept from the last run", "trust_domain", td.Name(), "path", r.statePath)
		return nil
	}
	return b
}

// sequence is b's spiffe_sequence, 0 without one.
func sequence(b *spiffebundle.Bundle) uint64 {
	n, _ := b.SequenceNumber()
	return n
}

// lastGood authenticates an https_spiffe endpoint with the last good bundle
// of its trust domain, so that its CA rotations are followed.
type lastGood struct {
	w *Watcher
	f *file
}

func (s lastGood) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if td != s.f.td || s.f.bundle == nil {
		return nil, fmt.Errorf("no bundle for %s", td.IDString())
	}
	return s.f.bundle.X509Bundle(), nil
}

// Failing is how many bundle endpoints failed their last fetch.
func (w *Watcher) Failing() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, f := range w.files {
		if f.failing {
			n++
		}
	}
	return n
}

// follow refreshes f from its bundle endpoint until ctx is done: at once,
// then as the last good bundle's refresh hint says, within the bounds.
func (w *Watcher) follow(ctx context.Context, f *file) {
	for {
		next := w.refresh(ctx, f)
		timer := w.clock.NewTimer(next)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C():
		}
	}
}

// refresh fetches f's bundle once and returns when to fetch again. A
// failure keeps the last good bundle: an endpoint that is down, or serves
// something wrong, must not take trust away from a working federation.
func (w *Watcher) refresh(ctx context.Context, f *file) time.Duration {
	r := f.remote
	b, data, reason, err := w.fetch(ctx, f)
	if ctx.Err() != nil {
		return w.minRefresh
	}
	if w.observe != nil {
		w.observe(reason)
	}
	if err != nil {
		r.failures++
		w.mu.Lock()
		f.failing = true
		w.mu.Unlock()
		// Retry sooner than the hint, backing off: min, 2*min, ... up to
		// the normal interval.
		retry := w.refreshInterval(f)
		if d := w.minRefresh << min(r.failures-1, 16); d < retry {
			retry = d
		}
		klog.ErrorS(err, "Bundle endpoint refresh failed; keeping the last good bundle", "trust_domain", f.td.Name(), "reason", reason, "url", r.url, "failures", r.failures, "retry_in", retry.String())
		return retry
	}
	r.failures = 0
	if r.statePath != "" {
		if err := fsutil.WriteFileAtomic(r.statePath, data, 0o600); err != nil {
			klog.ErrorS(err, "Cannot keep the federated bundle for the next start", "trust_domain", f.td.Name(), "path", r.statePath)
		}
	}
	w.mu.Lock()
	f.failing = false
	same := f.bundle != nil && f.bundle.Equal(b)
	f.bundle = b
	if !same {
		w.fireLocked()
	}
	w.mu.Unlock()
	if !same {
		n, _ := b.SequenceNumber()
		klog.InfoS("Federated bundle updated", "trust_domain", f.td.Name(), "url", r.url, "sequence", n,
			"x509_authorities", len(b.X509Authorities()), "jwt_authorities", len(b.JWTAuthorities()))
	}
	return w.refreshInterval(f)
}

// fetch gets and judges one bundle document: reason is ResultOK or why it
// is refused.
func (w *Watcher) fetch(ctx context.Context, f *file) (_ *spiffebundle.Bundle, data []byte, reason string, _ error) {
	data, err := f.remote.client.Fetch(ctx)
	if err != nil {
		var fe *endpoint.FetchError
		if errors.As(err, &fe) {
			return nil, nil, fe.Reason, err
		}
		return nil, nil, endpoint.ReasonUnreachable, err
	}
	b, err := parse(f.td, FormatSPIFFE, data)
	switch {
	case errors.Is(err, errOtherTrustDomain):
		return nil, nil, ReasonTrustDomain, err
	case err != nil:
		return nil, nil, ReasonMalformed, err
	}
	w.mu.Lock()
	last := f.bundle
	w.mu.Unlock()
	if last != nil {
		// A replayed or rolled-back document must not bring back
		// authorities the trust domain has retired.
		was, hadSeq := last.SequenceNumber()
		now, hasSeq := b.SequenceNumber()
		if hadSeq && hasSeq && now < was {
			return nil, nil, ReasonSequence, fmt.Errorf("spiffe_sequence %d is below %d, the last good bundle's", now, was)
		}
	}
	return b, data, ResultOK, nil
}

// refreshInterval is when to fetch f again: its bundle's refresh hint within the
// bounds, DefaultRefresh without one.
func (w *Watcher) refreshInterval(f *file) time.Duration {
	w.mu.Lock()
	b := f.bundle
	w.mu.Unlock()
	d := DefaultRefresh
	if b != nil {
		if hint, ok := b.RefreshHint(); ok && hint > 0 {
			d = hint
		}
	}
	return min(max(d, w.minRefresh), w.maxRefresh)
}
