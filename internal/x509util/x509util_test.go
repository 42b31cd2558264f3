package x509util

import (
	"crypto/x509"
	"testing"
	"time"
)

func TestValidity(t *testing.T) {
	base := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	parent := &x509.Certificate{NotBefore: base, NotAfter: base.Add(time.Hour)}
	for _, tc := range []struct {
		name           string
		now            time.Time
		backdate, ttl  time.Duration
		wantNB, wantNA time.Time
		wantErr        bool
	}{
		{"inside", base.Add(10*time.Minute + 500*time.Millisecond), 10 * time.Second, time.Minute,
			base.Add(9*time.Minute + 50*time.Second), base.Add(11 * time.Minute), false},
		{"backdate clamped to parent start", base.Add(time.Second), time.Minute, time.Minute,
			base, base.Add(61 * time.Second), false},
		{"end clamped to parent end", base.Add(59 * time.Minute), 0, time.Hour,
			base.Add(59 * time.Minute), base.Add(time.Hour), false},
		{"no backdate, sub-second now", base.Add(1500 * time.Millisecond), 0, 100 * time.Second,
			base.Add(time.Second), base.Add(101 * time.Second), false},
		{"parent expired", base.Add(2 * time.Hour), 0, time.Minute, time.Time{}, time.Time{}, true},
		{"zero ttl", base, 0, 0, time.Time{}, time.Time{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nb, na, err := Validity(tc.now, tc.backdate, tc.ttl, parent)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			if !nb.Equal(tc.wantNB) || !na.Equal(tc.wantNA) {
				t.Errorf("got [%s, %s], want [%s, %s]", nb, na, tc.wantNB, tc.wantNA)
			}
			if na.Sub(nb) > tc.backdate+tc.ttl {
				t.Errorf("lifetime %s exceeds backdate+ttl %s", na.Sub(nb), tc.backdate+tc.ttl)
			}
		})
	}
}

func TestSerial(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		s, err := Serial()
		if err != nil {
			t.Fatal(err)
		}
		if s.Sign() <= 0 || s.BitLen() != 127 {
			t.Fatalf("serial %s: sign %d, %d bits", s, s.Sign(), s.BitLen())
		}
		if seen[s.String()] {
			t.Fatalf("serial %s repeated", s)
		}
		seen[s.String()] = true
	}
}
