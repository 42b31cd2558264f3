package svidcache

import (
	"context"
	"encoding/hex"
	"time"

	"k8s.io/klog/v2"
)

// Run renews cached X.509-SVIDs at half life ahead of demand, waking their
// holders, evicts entries nobody asked for during a whole lifetime (and
// expired ones), and wakes every subscription when the authority's bundle
// or intermediate changes, until ctx is done; then it returns nil.
func (c *Cache) Run(ctx context.Context) error {
	authChanged := c.auth.Changed()
	for {
		next := c.sweep(ctx)
		if ctx.Err() != nil {
			return nil
		}
		now := c.now()
		if !next.IsZero() && !next.After(now) {
			continue
		}
		var timerC <-chan time.Time
		stop := func() {}
		if !next.IsZero() {
			// Timers count elapsed time, deadlines are wall time: waking
			// at least every maxSleep notices a step of the wall clock.
			t := c.clock.NewTimer(min(next.Sub(now), maxSleep))
			timerC, stop = t.C(), func() { t.Stop() }
		}
		select {
		case <-ctx.Done():
			stop()
			return nil
		case <-authChanged:
			// Re-subscribe before telling anyone, so no change slips between.
			authChanged = c.auth.Changed()
			c.Notify()
		case <-c.wake:
		case <-timerC:
		}
		stop()
	}
}

type due struct {
	k   key
	req request
}

// sweep evicts, renews what is due and returns the next deadline (zero when
// the cache is empty).
func (c *Cache) sweep(ctx context.Context) (next time.Time) {
	now := c.now()
	c.mu.Lock()
	dueX509, evicted, nextX509 := sweepTable(&c.x509, now, "X.509-SVID", true)
	_, _, nextJWT := sweepTable(&c.jwt, now, "JWT-SVID", false)
	c.mu.Unlock()
	next = earliest(nextX509, nextJWT)
	for _, k := range evicted {
		// Holders of an SVID that expired (or that a step of the wall
		// clock put outside its validity) must not keep it silently.
		c.wakeHolders(k, nil)
	}

	for _, d := range dueX509 {
		if ctx.Err() != nil {
			break
		}
		e, minted, err := renew(ctx, c, &c.x509, d.k, d.req, false, nil)
		if minted {
			// The audit line of a mint no caller asked for; holders
			// receive it as a delivery.
			leaf := e.val.Certificates[0]
			klog.InfoS("Renewed X.509-SVID ahead of demand", "spiffe_id", d.req.id.String(),
				"serial", hex.EncodeToString(leaf.SerialNumber.Bytes()), "expires", rfc3339(leaf.NotAfter))
		}
		if err == nil && e != nil {
			next = earliest(next, e.refreshAt)
		}
	}
	return next
}

// sweepTable drops expired and idle entries, collects entries past their
// refresh time when renewDue, and returns the earliest future deadline.
func sweepTable[V any](t *table[V], now time.Time, kind string, renewDue bool) (dues []due, evicted []key, next time.Time) {
	for k, e := range t.entries {
		idleUntil := time.Unix(0, e.lastUsed.Load()).Add(e.lifetime())
		if !e.valid(now) || !now.Before(idleUntil) {
			delete(t.entries, k)
			evicted = append(evicted, k)
			klog.V(2).InfoS("Evicted cached SVID", "kind", kind, "spiffe_id", e.req.id.String(), "expired", !e.valid(now))
			continue
		}
		next = earliest(next, earliest(idleUntil, e.expiresAt))
		if !renewDue {
			continue
		}
		if e.fresh(now) {
			next = earliest(next, e.refreshAt)
		} else {
			dues = append(dues, due{k, e.req})
		}
	}
	return dues, evicted, next
}

// maxSleep bounds Run's sleep, so that a step of the wall clock is seen.
const maxSleep = 30 * time.Second

// earliest of two deadlines, where zero means none.
func earliest(a, b time.Time) time.Time {
	switch {
	case a.IsZero():
		return b
	case b.IsZero() || a.Before(b):
		return a
	}
	return b
}
