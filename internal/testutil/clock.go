package testutil

import (
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// SteppingClock is a clock.Clock whose wall time and elapsed (monotonic)
// time move separately, as a real clock's do when the wall clock is stepped:
// StepWall moves Now and fires nothing; Advance moves both and fires the
// timers that come due. Times it returns carry no monotonic reading, so
// code that compares them sees the wall clock, as it must.
type SteppingClock struct {
	mu     sync.Mutex
	wall   time.Time
	mono   time.Duration // elapsed since the start
	timers []*steppingTimer
}

var _ clock.Clock = (*SteppingClock)(nil)

// NewSteppingClock starts at wall time t.
func NewSteppingClock(t time.Time) *SteppingClock { return &SteppingClock{wall: t.Round(0)} }

// Now is the wall time.
func (c *SteppingClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wall
}

// Since is Now().Sub(t).
func (c *SteppingClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }

// StepWall moves the wall clock by d (either way) without any time passing.
func (c *SteppingClock) StepWall(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wall = c.wall.Add(d)
}

// Advance lets d pass: wall and elapsed time both move, and timers fire.
func (c *SteppingClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.wall = c.wall.Add(d)
	c.mono += d
	var due []*steppingTimer
	kept := c.timers[:0]
	for _, t := range c.timers {
		if t.at <= c.mono {
			due = append(due, t)
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
	now := c.wall
	c.mu.Unlock()
	for _, t := range due {
		select {
		case t.c <- now:
		default:
		}
	}
}

// Waiters reports how many timers are pending, for tests that wait for a
// goroutine to go to sleep.
func (c *SteppingClock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// NewTimer fires after d of elapsed time.
func (c *SteppingClock) NewTimer(d time.Duration) clock.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &steppingTimer{clk: c, c: make(chan time.Time, 1), at: c.mono + d}
	c.timers = append(c.timers, t)
	return t
}

// After is NewTimer(d).C().
func (c *SteppingClock) After(d time.Duration) <-chan time.Time { return c.NewTimer(d).C() }

// Sleep is not supported: it would block the test's only clock.
func (c *SteppingClock) Sleep(time.Duration) { panic("SteppingClock: Sleep") }

// Tick is not supported.
func (c *SteppingClock) Tick(time.Duration) <-chan time.Time { panic("SteppingClock: Tick") }

type steppingTimer struct {
	clk *SteppingClock
	c   chan time.Time
	at  time.Duration
}

func (t *steppingTimer) C() <-chan time.Time { return t.c }

func (t *steppingTimer) Stop() bool {
	c := t.clk
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.timers {
		if x == t {
			c.timers = append(c.timers[:i], c.timers[i+1:]...)
			return true
		}
	}
	return false
}

func (t *steppingTimer) Reset(d time.Duration) bool {
	active := t.Stop()
	c := t.clk
	c.mu.Lock()
	t.at = c.mono + d
	c.timers = append(c.timers, t)
	c.mu.Unlock()
	return active
}
