// Package ca is the agent's issuing authority: it holds the trust anchor
// (self-managed or upstream), signs leaves through a short-lived in-memory
// intermediate, mints JWT-SVIDs and publishes the trust bundle.
//
// Chain of trust:
//
//	root (self-managed, persisted) or upstream CA (files)   ← in Bundle()
//	  └─ intermediate (in memory, IntermediateTTL, rotated at half life)
//	       └─ X.509-SVID leaf (X509SVIDTTL, clamped to the intermediate)
//
// Self-managed mode (default): on first start the agent creates a root
// (ECDSA P-256, self-signed, URI SAN spiffe://<trust-domain>, valid one
// year) and a JWT-SVID signing key, both in <StateDir>/ca.pem, and reuses
// them on every restart so the bundle stays the same. After two thirds of
// its life the root is replaced; the old one stays in the bundle until it
// expires. Each agent has its own root: agents on different nodes trust one
// another only in upstream mode.
//
// Upstream mode: a CA certificate and key from files (for example a
// Kubernetes Secret shared by all agents) are the trust anchor, and the
// JWT-SVID key is derived from that key, so all agents sharing it accept
// each other's X.509-SVIDs and JWT-SVIDs. Run re-reads the files and, when
// they hold a new valid pair, issues from it at once (see reload.go); the
// previous CA and JWT key stay in the bundle while what they signed lives.
//
// Cluster mode (cluster.go): a controller holds the root. The agent makes
// its intermediate key and its JWT-SVID key on the node, has them certified
// through a ClusterSigner (Kubernetes CSRs), renews both at half life with
// new keys, and serves the bundle a TrustSource publishes. Until the first
// intermediate and bundle arrive it is not Ready; a restart serves on what
// it persisted; once the intermediate expires unrenewed, minting fails.
//
// JWT-SVIDs are signed with one ES256 key: fixed when self-managed, replaced
// with the upstream key in upstream mode, this node's published key in
// cluster mode.
package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

const (
	minIntermediateTTL = time.Minute

	// rootTTL is the lifetime of a self-managed root. A new root is made once
	// rootRotateFraction of its life has passed; the old one stays in the
	// bundle until it expires, so SVIDs chained to it keep verifying.
	rootTTL = 365 * 24 * time.Hour

	// backdate allows for clock skew between the agent and relying parties.
	backdate = 10 * time.Second

	// retryAfter spaces out rotation attempts after a failure so a broken
	// upstream does not cost a key generation on every mint.
	retryAfter = 30 * time.Second
)

// rootRotateAt is when a root issued for [notBefore, notAfter] is replaced:
// after two thirds of its life.
func rootRotateAt(c *x509.Certificate) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotBefore.Add(life / 3 * 2)
}

// Options configures an Authority.
type Options struct {
	TrustDomain spiffeid.TrustDomain

	// StateDir holds the self-managed CA material (ca.pem, mode 0600, in a
	// 0700 directory). Ignored in upstream mode.
	StateDir string

	// UpstreamCertFile and UpstreamKeyFile, both set, select upstream mode:
	// the PEM certificate is the trust anchor and the PEM key (PKCS#1, PKCS#8
	// or SEC1; RSA or ECDSA) signs the agent's intermediates. Run re-reads
	// them, so a Secret mounted as a volume (not via subPath) can be updated.
	UpstreamCertFile string
	UpstreamKeyFile  string

	// Cluster, set, selects cluster mode (see cluster.go): the intermediate
	// and the JWT-SVID key are made in StateDir and certified by the
	// cluster, the bundle is what the cluster publishes.
	Cluster *ClusterOptions

	// JWTIssuer, when set, is the iss claim of every JWT-SVID.
	JWTIssuer string

	// Lifetimes (required; internal/config owns the defaults). The
	// intermediate is rotated at half life.
	X509SVIDTTL     time.Duration
	JWTSVIDTTL      time.Duration
	IntermediateTTL time.Duration

	Clock clock.Clock // nil means the real clock
}

// Authority mints SVIDs for one trust domain. It is safe for concurrent use.
type Authority struct {
	td       spiffeid.TrustDomain
	clock    clock.Clock
	x509TTL  time.Duration
	jwtTTL   time.Duration
	interTTL time.Duration

	// Immutable after New.
	statePath string         // "" in upstream and cluster mode
	upstream  *upstreamFiles // nil in self-managed mode
	cluster   *clusterState  // nil unless cluster mode
	jwtIssuer string

	mu      sync.RWMutex
	root    *signingCA    // signs intermediates: self-managed root or upstream CA
	oldRoot []retiredRoot // previous roots, still in the bundle
	inter   *signingCA    // signs leaves
	// The JWT-SVID key, and previous ones still in the bundle.
	jwtKey    *ecdsa.PrivateKey
	jwtKID    string
	jwtSigner jose.Signer
	oldJWT    []retiredJWT
	// interRotateAt is the intermediate's half life.
	interRotateAt time.Time
	// nextCheck is when rotate has work to do (or should retry).
	nextCheck time.Time
	bundle    *spiffebundle.Bundle
	changed   chan struct{}
}

// signingCA is a CA certificate with its private key.
type signingCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// retiredRoot is a root we no longer issue from, in the bundle until until.
type retiredRoot struct {
	cert  *x509.Certificate
	until time.Time
}

// retiredJWT is a JWT-SVID key we no longer sign with, in the bundle until until.
type retiredJWT struct {
	kid   string
	key   *ecdsa.PublicKey
	until time.Time
}

// New loads or creates the CA material and issues the first intermediate.
func New(ctx context.Context, opts Options) (*Authority, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("ca: trust domain is required")
	}
	a := &Authority{
		td:       opts.TrustDomain,
		clock:    opts.Clock,
		x509TTL:  opts.X509SVIDTTL,
		jwtTTL:   opts.JWTSVIDTTL,
		interTTL: opts.IntermediateTTL,
		changed:  make(chan struct{}),

		jwtIssuer: opts.JWTIssuer,
	}
	if a.clock == nil {
		a.clock = clock.RealClock{}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"X.509-SVID TTL", a.x509TTL},
		{"JWT-SVID TTL", a.jwtTTL},
		{"intermediate TTL", a.interTTL},
	} {
		if d.v <= 0 {
			return nil, fmt.Errorf("ca: %s must be positive, got %s", d.name, d.v)
		}
	}
	if a.interTTL < minIntermediateTTL {
		return nil, fmt.Errorf("ca: intermediate TTL %s is below the minimum %s", a.interTTL, minIntermediateTTL)
	}
	if a.x509TTL > a.interTTL/2 {
		// Leaves are clamped to the intermediate, which may have only half
		// its life left: such leaves come out shorter than configured.
		klog.InfoS("X.509-SVID TTL exceeds half the intermediate TTL; leaves will be shortened to the intermediate's remaining life",
			"x509_svid_ttl", a.x509TTL, "intermediate_ttl", a.interTTL)
	}

	now := a.now()
	switch {
	case opts.Cluster != nil:
		// Nothing from the cluster yet: Run asks for it, Ready tells when.
		a.mu.Lock()
		defer a.mu.Unlock()
		if err := a.newCluster(opts, now); err != nil {
			return nil, err
		}
		return a, nil
	case opts.UpstreamCertFile != "" && opts.UpstreamKeyFile != "":
		u := &upstreamFiles{certFile: opts.UpstreamCertFile, keyFile: opts.UpstreamKeyFile}
		up, err := u.load(a.td, now)
		if err != nil {
			return nil, err
		}
		a.upstream = u
		a.root = up
		j, err := deriveJWTSigning(up.key, a.td, u.keyFile)
		if err != nil {
			return nil, err
		}
		a.jwtKey, a.jwtKID, a.jwtSigner = j.key, j.kid, j.signer
		klog.InfoS("Using upstream CA", "trust_domain", a.td, "cert_path", opts.UpstreamCertFile,
			"subject", up.cert.Subject.String(), "expires", up.cert.NotAfter)
	case opts.UpstreamCertFile != "" || opts.UpstreamKeyFile != "":
		return nil, fmt.Errorf("ca: upstream mode needs both a certificate file and a key file (got cert %q, key %q)",
			opts.UpstreamCertFile, opts.UpstreamKeyFile)
	default:
		if opts.StateDir == "" {
			return nil, errors.New("ca: state directory is required for a self-managed CA")
		}
		st, err := openState(opts.StateDir, a.td, now)
		if err != nil {
			return nil, err
		}
		a.statePath = st.path
		a.root = st.root
		for _, c := range st.oldRoots {
			a.oldRoot = append(a.oldRoot, retiredRoot{cert: c, until: c.NotAfter})
		}
		a.jwtKey = st.jwtKey
		if a.jwtKID, a.jwtSigner, err = newJWTSigner(a.jwtKey); err != nil {
			return nil, err
		}
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	a.rebuildBundleLocked(now)
	if _, err := a.rotateLocked(now); err != nil {
		return nil, err
	}
	return a, nil
}

// X509SVIDTTL is the configured lifetime of X.509-SVIDs.
func (a *Authority) X509SVIDTTL() time.Duration { return a.x509TTL }

// JWTSVIDTTL is the configured lifetime of JWT-SVIDs.
func (a *Authority) JWTSVIDTTL() time.Duration { return a.jwtTTL }

// TrustDomain is the trust domain this authority issues for.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// Bundle returns a copy of the current bundle of our trust domain: every
// unexpired X.509 authority and the JWT authority.
func (a *Authority) Bundle() *spiffebundle.Bundle {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.bundle.Clone()
}

// Changed returns a channel that is closed the next time the bundle or the
// signing intermediate changes. Call it again after it fires.
func (a *Authority) Changed() <-chan struct{} {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.changed
}

// Run rotates the intermediate (and, self-managed, the root) on time, and
// in upstream mode reloads the upstream files when they change, until ctx
// is done. Minting also rotates when it finds the intermediate due, so
// a stalled Run never lets a leaf chain to an expired intermediate. It
// returns nil once ctx is done.
func (a *Authority) Run(ctx context.Context) error {
	if a.cluster != nil {
		return a.runCluster(ctx)
	}
	for {
		a.mu.RLock()
		// Timers count elapsed time; the schedule is in wall time. Waking at
		// least every maxSleep notices a wall-clock step within that long.
		wait := min(a.nextCheck.Sub(a.now()), maxSleep)
		a.mu.RUnlock()
		if a.upstream != nil {
			wait = min(wait, upstreamPollInterval)
		}
		if wait > 0 {
			t := a.clock.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C():
			}
		} else if ctx.Err() != nil {
			return nil
		}
		if a.upstream != nil {
			if err := a.reloadUpstream(); err != nil {
				klog.ErrorS(err, "Upstream CA files not loaded; still issuing from the current upstream CA",
					"trust_domain", a.td, "cert_path", a.upstream.certFile, "key_path", a.upstream.keyFile)
			}
		}
		a.mu.Lock()
		_, err := a.rotateLocked(a.now())
		a.mu.Unlock()
		if err != nil {
			klog.ErrorS(err, "CA rotation failed; will retry", "trust_domain", a.td, "retry_in", retryAfter)
		}
	}
}

// maxSleep bounds Run's sleep, so that a step of the wall clock is seen.
const maxSleep = 30 * time.Second

// now is the wall time without the monotonic reading: validity periods are
// in wall time, and comparing two readings of time.Now() would compare
// their monotonic clocks, blind to a step of the wall clock.
func (a *Authority) now() time.Time { return a.clock.Now().Round(0) }

// notYetValidLocked reports that the wall clock went back before the
// signing intermediate's start: leaves it signs would not verify.
func (a *Authority) notYetValidLocked(now time.Time) bool {
	return a.inter != nil && now.Before(a.inter.cert.NotBefore)
}

// currentIntermediate returns the intermediate to sign leaves with, rotating
// first when it is due.
func (a *Authority) currentIntermediate(now time.Time) (*signingCA, error) {
	if a.cluster != nil {
		// Renewal is Run's: the cluster answers in its own time.
		a.mu.RLock()
		inter := a.inter
		a.mu.RUnlock()
		if inter != nil && now.Before(inter.cert.NotBefore) {
			return nil, fmt.Errorf("ca: node intermediate is not valid before %s", rfc3339(inter.cert.NotBefore))
		}
		return checkUsable(inter, now)
	}
	a.mu.RLock()
	inter, due := a.inter, !now.Before(a.nextCheck) || a.notYetValidLocked(now)
	a.mu.RUnlock()
	if due {
		a.mu.Lock()
		if _, err := a.rotateLocked(now); err != nil {
			klog.ErrorS(err, "CA rotation failed; will retry", "trust_domain", a.td, "retry_in", retryAfter)
		}
		inter = a.inter
		a.mu.Unlock()
	}
	return checkUsable(inter, now)
}

// checkUsable returns inter when it can sign at now.
func checkUsable(inter *signingCA, now time.Time) (*signingCA, error) {
	if inter == nil {
		return nil, errors.New("ca: no signing intermediate")
	}
	if !now.Before(inter.cert.NotAfter) {
		return nil, fmt.Errorf("ca: signing intermediate expired at %s and could not be renewed", inter.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return inter, nil
}

// rotateLocked replaces the root (self-managed) and the intermediate when
// due. It reports whether anything changed, and fires Changed if so.
func (a *Authority) rotateLocked(now time.Time) (changed bool, err error) {
	if now.Before(a.nextCheck) && !a.notYetValidLocked(now) {
		return false, nil
	}
	rootFailed := false
	defer func() {
		if changed {
			a.fireChangedLocked()
		}
		a.scheduleLocked(now, err != nil, rootFailed)
	}()

	bundleChanged := a.dropExpiredLocked(now)
	if a.statePath != "" && !now.Before(rootRotateAt(a.root.cert)) {
		if err := a.rotateRootLocked(now); err != nil {
			if !now.Before(a.root.cert.NotAfter) {
				return bundleChanged, err
			}
			// The current root is still valid: keep issuing from it.
			klog.ErrorS(err, "Rotating the self-managed root failed; will retry", "path", a.statePath,
				"root_expires", a.root.cert.NotAfter, "retry_in", retryAfter)
			rootFailed = true
		} else {
			bundleChanged = true
		}
	}
	if bundleChanged {
		a.rebuildBundleLocked(now)
		changed = true
	}

	if a.inter == nil || !now.Before(a.interRotateAt) || a.notYetValidLocked(now) {
		inter, rotateAt, err := newIntermediate(a.td, a.root, now, a.interTTL)
		if err != nil {
			return changed, err
		}
		a.inter, a.interRotateAt = inter, rotateAt
		changed = true
		klog.InfoS("Issued signing intermediate", "trust_domain", a.td,
			"serial", inter.cert.SerialNumber.Text(16), "expires", inter.cert.NotAfter, "rotate_at", rotateAt)
		if inter.cert.NotAfter.Equal(a.root.cert.NotAfter) {
			klog.ErrorS(nil, "Signing intermediate cut short by its issuer's expiry; replace the CA before it expires",
				"trust_domain", a.td, "issuer", a.root.cert.Subject.String(), "issuer_expires", a.root.cert.NotAfter)
		}
	}
	return changed, nil
}

// scheduleLocked sets when rotateLocked next has work to do.
func (a *Authority) scheduleLocked(now time.Time, failed, rootFailed bool) {
	if failed || a.inter == nil {
		a.nextCheck = now.Add(retryAfter)
		return
	}
	next := a.interRotateAt
	if a.statePath != "" {
		t := rootRotateAt(a.root.cert)
		if rootFailed {
			t = now.Add(retryAfter)
		}
		if t.Before(next) {
			next = t
		}
	}
	for _, r := range a.oldRoot {
		if r.until.Before(next) {
			next = r.until
		}
	}
	for _, k := range a.oldJWT {
		if k.until.Before(next) {
			next = k.until
		}
	}
	a.nextCheck = next
}

// fireChangedLocked tells Changed's callers, and arms it for the next change.
func (a *Authority) fireChangedLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// dropExpiredLocked forgets previous roots and JWT keys whose time is up.
func (a *Authority) dropExpiredLocked(now time.Time) bool {
	roots := slices.DeleteFunc(slices.Clone(a.oldRoot), func(r retiredRoot) bool { return !now.Before(r.until) })
	keys := slices.DeleteFunc(slices.Clone(a.oldJWT), func(k retiredJWT) bool { return !now.Before(k.until) })
	dropped := len(roots) != len(a.oldRoot) || len(keys) != len(a.oldJWT)
	a.oldRoot, a.oldJWT = roots, keys
	return dropped
}

func (a *Authority) rebuildBundleLocked(now time.Time) {
	b := spiffebundle.New(a.td)
	b.AddX509Authority(a.root.cert)
	for _, r := range a.oldRoot {
		if now.Before(r.until) {
			b.AddX509Authority(r.cert)
		}
	}
	// AddJWTAuthority only fails on an empty key id, which keyID never returns.
	_ = b.AddJWTAuthority(a.jwtKID, &a.jwtKey.PublicKey)
	for _, k := range a.oldJWT {
		if now.Before(k.until) {
			_ = b.AddJWTAuthority(k.kid, k.key)
		}
	}
	a.bundle = b
}
