package rootca

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/controller/issue"
)

// ErrNoRoot is returned while no root is loaded (not the leader yet).
var ErrNoRoot = errors.New("rootca: no root CA loaded yet")

// NotSigningError is returned while the root is published but does not
// sign yet (State.SignsFrom).
type NotSigningError struct{ Until time.Time }

func (e *NotSigningError) Error() string {
	return "rootca: the root CA is published and signs from " + e.Until.UTC().Format(time.RFC3339) + " on, when every relying party has had the activation delay to see it"
}

// Holder is the root state the leader works with; safe for concurrent use.
type Holder struct {
	td  spiffeid.TrustDomain
	now func() time.Time

	mu     sync.RWMutex
	state  State
	loaded bool
	ready  chan struct{} // closed while loaded
}

// NewHolder returns an empty holder for td; now is the clock (nil: time.Now).
func NewHolder(td spiffeid.TrustDomain, now func() time.Time) *Holder {
	if now == nil {
		now = time.Now
	}
	return &Holder{td: td, now: now, ready: make(chan struct{})}
}

// Set replaces the state.
func (h *Holder) Set(s State) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.loaded {
		close(h.ready)
	}
	h.state, h.loaded = s, true
}

// Clear forgets the state (leadership lost).
func (h *Holder) Clear() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.loaded {
		h.ready = make(chan struct{})
	}
	h.state, h.loaded = State{}, false
}

// Wait returns once a root is loaded, or with ctx's error: leader-only
// signers start with it so that their first request finds a root.
func (h *Holder) Wait(ctx context.Context) error {
	h.mu.RLock()
	ready := h.ready
	h.mu.RUnlock()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// State is the current state, and whether one is loaded.
func (h *Holder) State() (State, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.state, h.loaded
}

// Current is the root that signs now: ErrNoRoot while none is loaded, a
// *NotSigningError while it waits for its activation.
func (h *Holder) Current() (issue.Parent, error) {
	s, ok := h.State()
	if !ok {
		return issue.Parent{}, ErrNoRoot
	}
	if h.now().Before(s.SignsFrom) {
		return issue.Parent{}, &NotSigningError{Until: s.SignsFrom}
	}
	return s.Current, nil
}

// Expiry is when the current root expires (zero when none is loaded).
func (h *Holder) Expiry() time.Time {
	s, ok := h.State()
	if !ok {
		return time.Time{}
	}
	return s.Current.Cert.NotAfter
}

// SignSVID issues an X.509-SVID for id over pub, signed by the current root
// and clamped to its life. The chain is the leaf alone: the root is in the
// trust bundle, not in the chain.
func (h *Holder) SignSVID(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if !id.MemberOf(h.td) {
		return nil, errors.New("rootca: " + id.String() + " is not in trust domain " + h.td.String())
	}
	p, err := h.Current()
	if err != nil {
		return nil, err
	}
	leaf, err := issue.SVID(p, pub, id, dnsNames, h.now(), ttl)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf}, nil
}
