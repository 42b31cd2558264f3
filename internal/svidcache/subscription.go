package svidcache

import (
	"cmp"
	"context"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// X509Key names a cached X.509-SVID: its SPIFFE ID and DNS names (order,
// case and duplicates of the names do not matter).
type X509Key struct {
	ID       spiffeid.ID
	DNSNames []string
}

// Subscription wakes one consumer, such as a Workload API stream, when an
// X.509-SVID it watches is renewed, and on every change that concerns all
// consumers: Notify, or a new bundle or signing intermediate from the
// authority while Run runs. Wake-ups coalesce: C holds at most one.
type Subscription struct {
	c    *Cache
	ch   chan struct{}
	keys []key // what s watches; guarded by c.subMu
}

// Subscribe returns a subscription that watches no SVID yet. Subscribe
// before reading what it is to watch, so that no change slips in between;
// Close it when done.
func (c *Cache) Subscribe() *Subscription {
	s := &Subscription{c: c, ch: make(chan struct{}, 1)}
	c.subMu.Lock()
	c.subs[s] = struct{}{}
	c.subMu.Unlock()
	return s
}

// C receives a value after each change s must react to.
func (s *Subscription) C() <-chan struct{} { return s.ch }

// Watch makes renewals of exactly these X.509-SVIDs wake s, replacing what s
// watched before. Call it before reading them with X509SVID: a renewal
// after Watch wakes s even if the read already returned the new SVID, so
// none goes unnoticed.
func (s *Subscription) Watch(svids []X509Key) {
	keys := make([]key, 0, len(svids))
	for _, k := range svids {
		keys = append(keys, x509Key(k.ID, k.DNSNames))
	}
	slices.SortFunc(keys, compareKeys)
	keys = slices.Compact(keys)

	c := s.c
	c.subMu.Lock()
	defer c.subMu.Unlock()
	if _, open := c.subs[s]; !open || slices.Equal(keys, s.keys) {
		return
	}
	s.unwatch()
	for _, k := range keys {
		w := c.watchers[k]
		if w == nil {
			w = map[*Subscription]struct{}{}
			c.watchers[k] = w
		}
		w[s] = struct{}{}
	}
	s.keys = keys
}

// Close stops s's wake-ups and releases what it watched. Idempotent.
func (s *Subscription) Close() {
	c := s.c
	c.subMu.Lock()
	defer c.subMu.Unlock()
	s.unwatch()
	delete(c.subs, s)
}

// unwatch drops s from every watcher set; c.subMu is held.
func (s *Subscription) unwatch() {
	for _, k := range s.keys {
		w := s.c.watchers[k]
		delete(w, s)
		if len(w) == 0 {
			delete(s.c.watchers, k)
		}
	}
	s.keys = nil
}

func (s *Subscription) wake() {
	select {
	case s.ch <- struct{}{}:
	default: // one pending wake-up is as good as several
	}
}

// wakeHolders wakes the subscriptions watching the X.509-SVID at k, but
// not except.
func (c *Cache) wakeHolders(k key, except *Subscription) {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	for s := range c.watchers[k] {
		if s != except {
			s.wake()
		}
	}
}

// X509SVID is Cache.X509SVID for the holder of s: when it mints, the other
// holders are woken but s is not, since it gets the new SVID here. (A
// stream woken by its own mint would attest its caller again for nothing.)
func (s *Subscription) X509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (svid *x509svid.SVID, minted bool, err error) {
	return get(ctx, s.c, &s.c.x509, x509Key(id, dnsNames), request{id, dnsNames}, s)
}

// wakeAll wakes every subscription.
func (c *Cache) wakeAll() {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	for s := range c.subs {
		s.wake()
	}
}

func x509Key(id spiffeid.ID, dnsNames []string) key {
	return key{id.String(), canonical(dnsNames, true)}
}

func compareKeys(a, b key) int {
	return cmp.Or(strings.Compare(a.id, b.id), strings.Compare(a.extra, b.extra))
}
