// Package svidcache caches the SVIDs the agent hands out, one per SPIFFE ID
// and request shape, renews them at half life and wakes the subscribers
// holding a renewed SVID, or all of them when everything changed.
package svidcache

import (
	"context"
	"encoding/binary"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/csi-agent/csi-agent/internal/ca"
)

const (
	// retryAfter spaces out renewals of an entry whose last renewal failed;
	// meanwhile the still-valid SVID keeps being served.
	retryAfter = 30 * time.Second

	// maxJWTEntries bounds the JWT cache: audiences come from workloads, so
	// a workload could otherwise grow it at will. Beyond it tokens are
	// minted uncached.
	maxJWTEntries = 4096

	// touchGranularity limits how often the hot path writes lastUsed, so
	// concurrent readers of one entry do not fight over its cache line.
	touchGranularity = time.Second
)

// Options configures a Cache.
type Options struct {
	Clock clock.Clock // nil means the real clock
	// Minted, if set, is told of every SVID minted: its kind ("x509",
	// "jwt") and whether it replaced a cached one (metrics).
	Minted func(kind string, rotation bool)
}

// Cache hands out SVIDs minted by an Authority, minting each (ID, DNS names)
// or (ID, audience) combination once and renewing it at half its lifetime.
// Returned SVIDs are shared between callers and must be treated as read-only.
type Cache struct {
	auth  *ca.Authority
	clock clock.Clock

	mu   sync.RWMutex
	x509 table[*x509svid.SVID]
	jwt  table[JWT]

	// subMu guards the subscriptions; it is never held while taking mu.
	subMu    sync.Mutex
	subs     map[*Subscription]struct{}
	watchers map[key]map[*Subscription]struct{} // X.509 entry -> holders

	wake   chan struct{} // a new entry may move Run's next deadline
	minted func(kind string, rotation bool)
	mints  atomic.Int64 // minting calls made, for tests
}

// JWT is a JWT-SVID and its expiry.
type JWT struct {
	Token   string
	Expires time.Time
}

// request is what an entry is minted from: DNS names for X.509-SVIDs, the
// audience for JWT-SVIDs.
type request struct {
	id    spiffeid.ID
	extra []string
}

type key struct {
	id, extra string
}

type entry[V any] struct {
	req       request
	val       V
	mintedAt  time.Time
	refreshAt time.Time // half life, or a retry time after a failed renewal
	expiresAt time.Time
	lastUsed  atomic.Int64 // unix nanoseconds of the last request
}

func (e *entry[V]) lifetime() time.Duration { return e.expiresAt.Sub(e.mintedAt) }

func (e *entry[V]) touch(now time.Time) {
	n := now.UnixNano()
	if n-e.lastUsed.Load() >= int64(touchGranularity) {
		e.lastUsed.Store(n)
	}
}

type flight[V any] struct {
	done  chan struct{}
	entry *entry[V]
	err   error
}

type table[V any] struct {
	entries map[key]*entry[V]
	flights map[key]*flight[V]
	mint    func(ctx context.Context, req request) (V, time.Time, error)
	limit   int // 0: unlimited
	// wakeHolders: subscriptions watch these entries and must re-read them
	// when they change.
	wakeHolders bool
	kind        string // as Options.Minted is told it
}

// New returns an empty cache in front of auth.
func New(auth *ca.Authority, opts Options) *Cache {
	c := &Cache{
		auth:     auth,
		clock:    opts.Clock,
		subs:     map[*Subscription]struct{}{},
		watchers: map[key]map[*Subscription]struct{}{},
		wake:     make(chan struct{}, 1),
		minted:   opts.Minted,
	}
	if c.clock == nil {
		c.clock = clock.RealClock{}
	}
	c.x509 = table[*x509svid.SVID]{
		entries:     map[key]*entry[*x509svid.SVID]{},
		flights:     map[key]*flight[*x509svid.SVID]{},
		mint:        c.mintX509,
		wakeHolders: true,
		kind:        "x509",
	}
	c.jwt = table[JWT]{
		entries: map[key]*entry[JWT]{},
		flights: map[key]*flight[JWT]{},
		mint:    c.mintJWT,
		limit:   maxJWTEntries,
		kind:    "jwt",
	}
	return c
}

// X509SVID returns the cached X.509-SVID for id and dnsNames (order, case and
// duplicates of the names do not matter), minting it on first use or once
// past half its lifetime. minted reports that this call minted it, so that
// the caller can audit the mint once with who caused it; every other
// caller shares the result.
func (c *Cache) X509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (svid *x509svid.SVID, minted bool, err error) {
	return get(ctx, c, &c.x509, x509Key(id, dnsNames), request{id, dnsNames}, nil)
}

// JWTSVID returns a cached JWT-SVID for id and the audience set, minting one
// on first use or once past half its lifetime; minted as for X509SVID.
func (c *Cache) JWTSVID(ctx context.Context, id spiffeid.ID, audience []string) (jwt JWT, minted bool, err error) {
	return get(ctx, c, &c.jwt, key{id.String(), canonical(audience, false)}, request{id, audience}, nil)
}

// Notify wakes every subscription: everything may have changed, for
// example after a configuration reload.
func (c *Cache) Notify() { c.wakeAll() }

// now is the wall time without the monotonic reading: SVID validity is in
// wall time, and two readings of time.Now() compare by their monotonic
// clocks, blind to a step of the wall clock.
func (c *Cache) now() time.Time { return c.clock.Now().Round(0) }

// fresh reports that the entry can be served without renewing: inside its
// validity (the wall clock may have gone back before it was minted) and
// before its refresh time.
func (e *entry[V]) fresh(now time.Time) bool { return e.valid(now) && now.Before(e.refreshAt) }

// valid reports that the entry's SVID is inside its validity at now.
func (e *entry[V]) valid(now time.Time) bool {
	return !now.Before(e.mintedAt) && now.Before(e.expiresAt)
}

// get returns the entry's value; minted reports that this call minted it.
// A mint wakes the entry's holders, except the subscription that asked:
// it holds the new value already.
func get[V any](ctx context.Context, c *Cache, t *table[V], k key, req request, asker *Subscription) (_ V, minted bool, _ error) {
	now := c.now()
	c.mu.RLock()
	e := t.entries[k]
	c.mu.RUnlock()
	if e != nil && e.fresh(now) {
		e.touch(now)
		return e.val, false, nil
	}
	e, minted, err := renew(ctx, c, t, k, req, true, asker)
	if err != nil {
		var zero V
		return zero, false, err
	}
	return e.val, minted, nil
}

// renew mints the entry for k once, however many goroutines ask at the same
// time; the others wait for that one result. A failed renewal falls back to
// the previous SVID while it is still valid. used says whether a workload
// asked (as opposed to Run renewing ahead of time). minted reports that this
// call minted the value it returns; the entry's holders have been woken,
// as they are when an expired entry is dropped.
func renew[V any](ctx context.Context, c *Cache, t *table[V], k key, req request, used bool, asker *Subscription) (_ *entry[V], minted bool, _ error) {
	c.mu.Lock()
	old := t.entries[k]
	if now := c.now(); old != nil && old.fresh(now) {
		// Someone renewed it while we were getting here.
		c.mu.Unlock()
		if used {
			old.touch(now)
		}
		return old, false, nil
	}
	if f, ok := t.flights[k]; ok {
		c.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
		if f.err == nil && used {
			f.entry.touch(c.now())
		}
		return f.entry, false, f.err
	}
	f := &flight[V]{done: make(chan struct{})}
	t.flights[k] = f
	c.mu.Unlock()

	// The mint must not fail for the waiters because this caller gave up.
	val, expiresAt, err := t.mint(context.WithoutCancel(ctx), req)
	c.mints.Add(1)
	now := c.now()

	c.mu.Lock()
	var (
		e       *entry[V]
		dropped bool
	)
	switch {
	case err == nil:
		e = &entry[V]{req: req, val: val, mintedAt: now, expiresAt: expiresAt}
		e.refreshAt = now.Add(e.lifetime() / 2)
		minted = true
		if old != nil {
			e.lastUsed.Store(old.lastUsed.Load())
		} else {
			e.lastUsed.Store(now.UnixNano())
		}
		if t.limit == 0 || old != nil || len(t.entries) < t.limit {
			t.entries[k] = e
		}
	case old != nil && old.valid(now):
		klog.ErrorS(err, "Renewing SVID failed; serving the previous one until it expires",
			"spiffe_id", req.id.String(), "expires", rfc3339(old.expiresAt), "retry_in", retryAfter)
		e = &entry[V]{req: old.req, val: old.val, mintedAt: old.mintedAt, expiresAt: old.expiresAt}
		e.refreshAt = minTime(now.Add(retryAfter), old.expiresAt)
		e.lastUsed.Store(old.lastUsed.Load())
		t.entries[k] = e
		err = nil
	case old != nil:
		delete(t.entries, k)
		dropped = true
	}
	if used && e != nil {
		e.touch(now)
	}
	delete(t.flights, k)
	f.entry, f.err = e, err
	c.mu.Unlock()
	close(f.done)

	if minted && c.minted != nil {
		c.minted(t.kind, old != nil)
	}
	if (minted || dropped) && t.wakeHolders {
		// Also on a first mint (an entry evicted and minted again may
		// still have holders of the old one) and when the SVID expired
		// unrenewed: its holders must not keep it silently.
		c.wakeHolders(k, asker)
	}
	if minted && old == nil {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
	return e, minted, err
}

func (c *Cache) mintX509(ctx context.Context, req request) (*x509svid.SVID, time.Time, error) {
	svid, err := c.auth.MintX509SVID(ctx, req.id, req.extra)
	if err != nil {
		return nil, time.Time{}, err
	}
	return svid, svid.Certificates[0].NotAfter, nil
}

func (c *Cache) mintJWT(ctx context.Context, req request) (JWT, time.Time, error) {
	token, exp, err := c.auth.MintJWTSVID(ctx, req.id, req.extra)
	if err != nil {
		return JWT{}, time.Time{}, err
	}
	return JWT{token, exp}, exp, nil
}

// canonical encodes a set of strings as a map key: sorted, deduplicated and
// length-prefixed so that no two different sets share a key. DNS names are
// compared case-insensitively and without a trailing dot, as the CA issues
// them.
func canonical(vals []string, dns bool) string {
	switch len(vals) {
	case 0:
		return ""
	case 1:
		if !dns {
			return lengthPrefixed(vals)
		}
	}
	vs := slices.Clone(vals)
	if dns {
		for i, v := range vs {
			vs[i] = strings.TrimSuffix(strings.ToLower(v), ".")
		}
	}
	slices.Sort(vs)
	return lengthPrefixed(slices.Compact(vs))
}

func lengthPrefixed(vs []string) string {
	n := 0
	for _, v := range vs {
		n += binary.MaxVarintLen64 + len(v)
	}
	b := make([]byte, 0, n)
	for _, v := range vs {
		b = binary.AppendUvarint(b, uint64(len(v)))
		b = append(b, v...)
	}
	return string(b)
}

// rfc3339 formats an expiry as audit lines carry it.
func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
