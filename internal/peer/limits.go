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
	// Refused, if set, is told of each connection refused at the handshake:
	// reason is one of the Refused* constants (a fixed set, fit for a metric
	// label), err what the handshake returned.
	Refused func(reason string, info Info, err error)
}

// Why a connection was refused at the handshake, as Limits.Refused is told.
const (
	RefusedTotal      = "connection_limit"            // Total reached
	RefusedCaller     = "caller_connection_limit"     // PerCaller reached
	RefusedUnattested = "unattested_connection_limit" // Unproven reached, nothing to evict
)

// Refusals lists every reason Limits.Refused may be told.
func Refusals() []string { return []string{RefusedTotal, RefusedCaller, RefusedUnattested} }

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
	callers  map[string]*callerConns
}

// callerConns are one caller's open connections.
type callerConns struct {
	open     int
	unproven []*slot // not yet served an identity, oldest first
}

func newAdmission(l Limits) *admission {
	if l.CallerKey == nil {
		l.CallerKey = uidKey
	}
	return &admission{limits: l, callers: map[string]*callerConns{}}
}

// slot is one admitted connection.
type slot struct {
	a     *admission
	key   string
	close func() error // drops the connection, for an eviction

	proven, released bool // under a.mu

	revoked atomic.Pointer[string] // why the connection may no longer be served
}

// admit counts a new connection of info's caller, or refuses it. When the
// connections without an identity are at their limit, the oldest of the
// caller holding the most of them makes room, unless that is this caller
// (or no caller holds clearly more): a flood of idle connections from some
// callers cannot keep another caller's new connection out.
func (a *admission) admit(info Info, closeConn func() error) (*slot, error) {
	sl, reason, err := a.count(info, closeConn)
	if err != nil && a.limits.Refused != nil {
		// Outside the lock: the hook may log or count.
		a.limits.Refused(reason, info, err)
	}
	return sl, err
}

// count is admit under the lock; a refusal comes with its reason.
func (a *admission) count(info Info, closeConn func() error) (*slot, string, error) {
	key := a.limits.CallerKey(info)
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.limits
	c := a.callers[key]
	if c == nil {
		c = &callerConns{}
	}
	switch {
	case l.Total > 0 && a.total >= l.Total:
		return nil, RefusedTotal, fmt.Errorf("%w: %d open, the limit", ErrTooManyConnections, a.total)
	case l.PerCaller > 0 && c.open >= l.PerCaller:
		return nil, RefusedCaller, fmt.Errorf("%w: %d open from %s, the limit", ErrTooManyConnections, c.open, key)
	case l.Unproven > 0 && a.unproven >= l.Unproven:
		victim := a.evictableLocked(key, len(c.unproven))
		if victim == nil {
			return nil, RefusedUnattested, fmt.Errorf("%w: %d open without an identity, the limit", ErrTooManyConnections, a.unproven)
		}
		a.releaseLocked(victim)
		go victim.close()
	}
	a.callers[key] = c
	sl := &slot{a: a, key: key, close: closeConn}
	a.total++
	a.unproven++
	c.open++
	c.unproven = append(c.unproven, sl)
	return sl, "", nil
}

// evictableLocked picks the oldest unproven connection of the caller with
// the most of them, if that caller is another and holds more than one
// beyond what the newcomer holds.
func (a *admission) evictableLocked(newcomer string, held int) *slot {
	var most *callerConns
	mostKey := ""
	for k, c := range a.callers {
		if most == nil || len(c.unproven) > len(most.unproven) {
			most, mostKey = c, k
		}
	}
	if most == nil || mostKey == newcomer || len(most.unproven) <= held+1 {
		return nil
	}
	return most.unproven[0]
}

// prove moves the connection out of the unproven pool, once.
func (s *slot) prove() {
	if s == nil {
		return
	}
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if s.proven || s.released {
		return
	}
	s.proven = true
	a.unproven--
	a.dropUnprovenLocked(s)
}

func (s *slot) release() {
	if s == nil {
		return
	}
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	s.a.releaseLocked(s)
}

func (a *admission) releaseLocked(s *slot) {
	if s.released {
		return
	}
	s.released = true
	a.total--
	if !s.proven {
		a.unproven--
		a.dropUnprovenLocked(s)
	}
	if c := a.callers[s.key]; c != nil {
		if c.open--; c.open <= 0 {
			delete(a.callers, s.key)
		}
	}
}

func (a *admission) dropUnprovenLocked(s *slot) {
	c := a.callers[s.key]
	if c == nil {
		return
	}
	for i, x := range c.unproven {
		if x == s {
			c.unproven = append(c.unproven[:i], c.unproven[i+1:]...)
			return
		}
	}
}
