package peer

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
)

// ErrTooManyConnections refuses a connection over one of the Limits.
var ErrTooManyConnections = errors.New("too many connections")

// Limits bound the connections callers can make the agent hold. Each
// connection costs a file descriptor and gRPC's buffers whether or not its
// caller ever gets an identity.
type Limits struct {
	// Total bounds all open connections; zero means no bound.
	Total int
	// Unproven bounds the connections that have not yet been served an
	// identity (MarkEntitled): the rest of Total is kept for callers that
	// hold one, so a flood of idle connections cannot lock them out.
	Unproven int
	// PerCaller bounds the open connections of one caller; zero: no bound.
	PerCaller int
	// CallerKey names a connection's caller; nil means by effective uid.
	CallerKey func(Info) string
}

// Caller names the connection's caller as Limits.CallerKey did; callers
// admitted without Limits are named by uid.
func (i Info) Caller() string {
	if i.slot != nil {
		return i.slot.key
	}
	return uidKey(i)
}

func uidKey(i Info) string { return "uid:" + strconv.FormatUint(uint64(i.UID), 10) }

// admission counts open connections against Limits.
type admission struct {
	limits Limits

	mu       sync.Mutex
	total    int
	unproven int
	byCaller map[string]int
}

func newAdmission(l Limits) *admission {
	if l.CallerKey == nil {
		l.CallerKey = uidKey
	}
	return &admission{limits: l, byCaller: map[string]int{}}
}

// slot is one admitted connection.
type slot struct {
	a        *admission
	key      string
	proven   atomic.Bool
	released atomic.Bool
	revoked  atomic.Pointer[string] // why the connection may no longer be served
}

func (a *admission) admit(info Info) (*slot, error) {
	key := a.limits.CallerKey(info)
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.limits
	switch {
	case l.Total > 0 && a.total >= l.Total:
		return nil, fmt.Errorf("%w: %d open, the limit", ErrTooManyConnections, a.total)
	case l.Unproven > 0 && a.unproven >= l.Unproven:
		return nil, fmt.Errorf("%w: %d open without an identity, the limit", ErrTooManyConnections, a.unproven)
	case l.PerCaller > 0 && a.byCaller[key] >= l.PerCaller:
		return nil, fmt.Errorf("%w: %d open from %s, the limit", ErrTooManyConnections, a.byCaller[key], key)
	}
	a.total++
	a.unproven++
	a.byCaller[key]++
	return &slot{a: a, key: key}, nil
}

// prove moves the connection out of the unproven pool, once.
func (s *slot) prove() {
	if s == nil || s.released.Load() || !s.proven.CompareAndSwap(false, true) {
		return
	}
	s.a.mu.Lock()
	if !s.released.Load() {
		s.a.unproven--
	}
	s.a.mu.Unlock()
}

func (s *slot) release() {
	if s == nil || !s.released.CompareAndSwap(false, true) {
		return
	}
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	s.a.total--
	if !s.proven.Load() {
		s.a.unproven--
	}
	if s.a.byCaller[s.key]--; s.a.byCaller[s.key] <= 0 {
		delete(s.a.byCaller, s.key)
	}
}
