package k8s

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/utils/clock"
)

// errDeadline: the caller's own bound passed before a new enough list came.
var errDeadline = errors.New("deadline passed waiting for the kubelet pod list")

// podCache shares kubelet requests among all attestations: one request in
// flight at a time, at most one started per minInterval, and each answer
// kept for whoever comes next.
type podCache struct {
	lister         PodLister
	clock          clock.Clock
	minInterval    time.Duration
	requestTimeout time.Duration
	requests       atomic.Uint64

	mu        sync.Mutex
	cur       *podList // latest successful answer
	gen       uint64
	lastStart time.Time // start of the latest request, successful or not
	started   bool
	inflight  *fetch
}

type fetch struct {
	done chan struct{}
	list *podList
	err  error
}

// current returns the latest list, or nil, without asking the kubelet.
func (c *podCache) current() *podList {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// newerThan returns a list newer than generation gen (0: any list). It joins
// the request in flight, or starts one once minInterval has passed since the
// last. It returns errDeadline at deadline (by c.clock), ctx's error when ctx
// ends, and the request's error when the request the caller waited on failed.
func (c *podCache) newerThan(ctx context.Context, gen uint64, deadline time.Time) (*podList, error) {
	for {
		c.mu.Lock()
		if c.cur != nil && c.cur.gen > gen {
			l := c.cur
			c.mu.Unlock()
			return l, nil
		}
		f := c.inflight
		if f == nil {
			now := c.clock.Now()
			if next := c.lastStart.Add(c.minInterval); c.started && now.Before(next) {
				c.mu.Unlock()
				if err := c.sleepUntil(ctx, next, deadline); err != nil {
					return nil, err
				}
				continue
			}
			f = &fetch{done: make(chan struct{})}
			c.inflight, c.lastStart, c.started = f, now, true
			// The request belongs to every waiter, not to this caller: it runs on
			// its own so one caller giving up does not cancel it for the others.
			go c.run(f, now)
		}
		c.mu.Unlock()
		// Wait on this very request, so its outcome (an error above all) is
		// the caller's even when it ends before the caller looks again.
		if err := c.waitFor(ctx, f.done, deadline); err != nil {
			return nil, err
		}
		if f.err != nil {
			return nil, f.err
		}
		if f.list.gen > gen {
			return f.list, nil
		}
	}
}

func (c *podCache) run(f *fetch, start time.Time) {
	c.requests.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), c.requestTimeout)
	defer cancel()
	var list *podList
	body, err := c.lister.ListPods(ctx)
	if err == nil {
		list, err = parsePodList(body)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		c.gen++
		list.gen, list.fetchedAt = c.gen, start
		c.cur = list
	}
	c.inflight = nil
	f.list, f.err = list, err
	close(f.done)
}

func (c *podCache) waitFor(ctx context.Context, done <-chan struct{}, deadline time.Time) error {
	select {
	case <-done:
		return nil
	default:
	}
	d := deadline.Sub(c.clock.Now())
	if d <= 0 {
		return errDeadline
	}
	t := c.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C():
		return errDeadline
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *podCache) sleepUntil(ctx context.Context, wake, deadline time.Time) error {
	last := wake.After(deadline)
	if last {
		wake = deadline
	}
	if d := wake.Sub(c.clock.Now()); d > 0 {
		t := c.clock.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C():
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if last {
		return errDeadline
	}
	return nil
}
