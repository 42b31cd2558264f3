package svidcache

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

// After a step of the wall clock, either way, the holders of an SVID are
// woken within maxSleep of elapsed time and get one valid at the new wall
// time; the cache never hands out one outside its validity.
func TestWallClockStep(t *testing.T) {
	for _, step := range []time.Duration{2 * time.Hour, -2 * time.Hour} { // inside the intermediate's life: the cache alone must see it
		t.Run(step.String(), func(t *testing.T) {
			clk := testutil.NewSteppingClock(time.Now())
			auth, err := ca.New(context.Background(), ca.Options{TrustDomain: testTD, StateDir: t.TempDir(), Clock: clk,
				X509SVIDTTL: time.Hour, JWTSVIDTTL: 5 * time.Minute, IntermediateTTL: 24 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			cache := New(auth, Options{Clock: clk})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{}, 2)
			go func() { _ = auth.Run(ctx); done <- struct{}{} }()
			go func() { _ = cache.Run(ctx); done <- struct{}{} }()
			t.Cleanup(func() { cancel(); <-done; <-done })

			id := spiffeid.RequireFromPath(testTD, "/w")
			sub := cache.Subscribe()
			defer sub.Close()
			sub.Watch([]X509Key{{ID: id}})
			check := func(d time.Duration) {
				t.Helper()
				if _, _, err := cache.X509SVID(ctx, id, nil); err != nil {
					t.Fatal(err)
				}
				waitFor(t, func() bool { return clk.Waiters() >= 2 }) // both Runs asleep
				drain(sub.C())
				clk.StepWall(d)
				clk.Advance(31 * time.Second) // a little past maxSleep, however long the next deadline
				select {
				case <-sub.C():
				case <-time.After(5 * time.Second):
					t.Fatalf("wall clock stepped %v: the holder was not woken within %v of elapsed time", d, maxSleep)
				}
				svid, _, err := cache.X509SVID(ctx, id, nil)
				if err != nil {
					t.Fatalf("after the step: %v", err)
				}
				now := clk.Now()
				for _, c := range svid.Certificates {
					if now.Before(c.NotBefore) || !now.Before(c.NotAfter) {
						t.Fatalf("served %s valid %s to %s at wall time %s", c.Subject, c.NotBefore, c.NotAfter, now)
					}
				}
			}
			check(96 * time.Hour) // a CA with some days behind it, as on a node
			check(step)
		})
	}
}

func drain(c <-chan struct{}) {
	select {
	case <-c:
	default:
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(time.Millisecond)
	}
}
