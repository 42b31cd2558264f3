package rootca

import (
	"bytes"
	"time"

	"github.com/csi-agent/csi-agent/internal/controller/issue"
)

// Policy times a rotation.
type Policy struct {
	// ActivationDelay is how long a next root is published before it signs:
	// time for every agent and pod to see it in the trust bundle.
	ActivationDelay time.Duration
	// Retain is how long a replaced root stays published: the longest life
	// of anything it signed (the maximum intermediate TTL).
	Retain time.Duration
}

// RotateAt is when a root is replaced: at 2/3 of its life.
func RotateAt(s issue.Parent) time.Time {
	life := s.Cert.NotAfter.Sub(s.Cert.NotBefore)
	return s.Cert.NotBefore.Add(life / 3 * 2)
}

// Step moves s on to now: it activates a next root whose time has come,
// drops previous roots past their retention and, for a managed root, makes
// a next root (with generate) when the current one is due or a rotation
// was asked for. It reports whether anything changed.
func Step(s State, now time.Time, p Policy, generate func() (issue.Parent, error)) (State, bool, error) {
	changed := false
	if s.Next != nil && (!now.Before(s.NextActivates) || !now.Before(s.Current.Cert.NotAfter)) {
		// An expired current root would sign nothing useful: activate early.
		s.Previous = append(s.Previous, s.Current.Cert)
		if until := now.Add(p.Retain); until.After(s.PreviousUntil) {
			s.PreviousUntil = until
		}
		s.Current, s.Next, s.NextActivates = *s.Next, nil, time.Time{}
		changed = true
	}
	if len(s.Previous) > 0 {
		kept := s.Previous[:0:0]
		for _, c := range s.Previous {
			if now.Before(s.PreviousUntil) && now.Before(c.NotAfter) && !bytes.Equal(c.Raw, s.Current.Cert.Raw) {
				kept = append(kept, c)
			}
		}
		if len(kept) != len(s.Previous) {
			changed = true
		}
		s.Previous = kept
		if len(kept) == 0 {
			s.PreviousUntil = time.Time{}
		}
	}
	if s.Managed && s.RotateRequested {
		s.RotateRequested = false
		changed = true
		if s.Next == nil {
			if err := makeNext(&s, now, p, generate); err != nil {
				return s, changed, err
			}
		}
	}
	if s.Managed && s.Next == nil && !now.Before(RotateAt(s.Current)) {
		if err := makeNext(&s, now, p, generate); err != nil {
			return s, changed, err
		}
		changed = true
	}
	return s, changed, nil
}

func makeNext(s *State, now time.Time, p Policy, generate func() (issue.Parent, error)) error {
	next, err := generate()
	if err != nil {
		return err
	}
	s.Next, s.NextActivates = &next, now.Add(p.ActivationDelay)
	return nil
}

// Adopt takes the root of a user-supplied Secret: a root not seen before is
// published first and signs only after the activation delay.
func Adopt(s State, root issue.Parent, now time.Time, p Policy) (State, bool) {
	if bytes.Equal(root.Cert.Raw, s.Current.Cert.Raw) {
		return s, false
	}
	if s.Next != nil && bytes.Equal(root.Cert.Raw, s.Next.Cert.Raw) {
		return s, false
	}
	s.Next, s.NextActivates = &root, now.Add(p.ActivationDelay)
	return s, true
}

// Wake is when Step next has something to do (zero: nothing planned).
func Wake(s State) time.Time {
	var at time.Time
	earliest := func(t time.Time) {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	if s.Next != nil {
		earliest(s.NextActivates)
	} else if s.Managed {
		earliest(RotateAt(s.Current))
	}
	if len(s.Previous) > 0 {
		earliest(s.PreviousUntil)
		for _, c := range s.Previous {
			earliest(c.NotAfter)
		}
	}
	return at
}
