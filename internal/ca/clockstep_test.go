package ca

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// A step of the wall clock, either way, is noticed within maxSleep of
// elapsed time: the intermediate is re-issued for the new wall time and
// subscribers are told, so no one keeps serving from a chain that is expired
// or not yet valid at the new time.
func TestWallClockStep(t *testing.T) {
	for _, step := range []time.Duration{48 * time.Hour, -48 * time.Hour} {
		t.Run(step.String(), func(t *testing.T) {
			clk := testutil.NewSteppingClock(time.Now())
			a, err := newCA(context.Background(), Options{TrustDomain: testTD, StateDir: t.TempDir(), Clock: clk})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- a.Run(ctx) }()
			t.Cleanup(func() { cancel(); <-done })
			stepAndWait := func(d time.Duration) {
				t.Helper()
				waitFor(t, "Run to sleep", func() bool { return clk.Waiters() > 0 })
				changed := a.Changed()
				clk.StepWall(d)
				clk.Advance(31 * time.Second) // a little past maxSleep, however long the next deadline
				select {
				case <-changed:
				case <-time.After(5 * time.Second):
					t.Fatalf("wall clock stepped %v: no rotation within %v of elapsed time", d, maxSleep)
				}
			}
			// A root with some days behind it, as on a real node, so that a
			// step back stays inside its life.
			stepAndWait(96 * time.Hour)
			stepAndWait(step)
			now := clk.Now()
			svid, err := a.MintX509SVID(context.Background(), spiffeid.RequireFromPath(testTD, "/w"), nil)
			if err != nil {
				t.Fatalf("mint after the step: %v", err)
			}
			for _, c := range svid.Certificates {
				if now.Before(c.NotBefore) || !now.Before(c.NotAfter) {
					t.Fatalf("%s valid %s to %s, not at the new wall time %s", c.Subject, c.NotBefore, c.NotAfter, now)
				}
			}
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
