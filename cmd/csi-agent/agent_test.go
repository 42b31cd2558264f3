package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/fsutil"
	"github.com/csi-agent/csi-agent/internal/rules"
)

func startRun(t *testing.T, args ...string) (stop func() error) {
	t.Helper()
	dir := t.TempDir()
	args = append([]string{"--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", filepath.Join(dir, "s")}, args...)
	cfg, err := config.FromArgs(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	started, done := launch(ctx, cfg)
	select {
	case <-started:
	case err := <-done:
		cancel()
		t.Fatalf("agent did not start: %v", err)
	case <-time.After(20 * time.Second):
		cancel()
		t.Fatal("agent did not start within 20s")
	}
	return func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("agent did not stop within 10s")
			return nil
		}
	}
}

// launch runs the agent on cfg until ctx ends; started closes once it serves.
func launch(ctx context.Context, cfg config.Config) (started <-chan struct{}, done <-chan error) {
	s, d := make(chan struct{}), make(chan error, 1)
	go func() { d <- runAgentConfig(ctx, cfg, agentOptions{version: "test", started: func() { close(s) }}) }()
	return s, d
}

func TestRunStartsAndStops(t *testing.T) {
	// Kubernetes attestation through the kubelet's read-only port: the
	// default service-account token must not be required then.
	stop := startRun(t, "--kubernetes", "--cross-check", "off", "--kubelet-read-only-port", "10255")
	if err := stop(); err != nil {
		t.Fatalf("Run returned %v after cancel", err)
	}
}

// reloadHarness runs reloadOnHUP over a fake config source and records every
// rule set it applies.
type reloadHarness struct {
	hup     chan os.Signal
	applied chan *rules.Set
	reads   atomic.Int32
	next    atomic.Pointer[func() (config.Config, error)]
}

func startReload(t *testing.T, configured bool) *reloadHarness {
	t.Helper()
	h := &reloadHarness{hup: make(chan os.Signal, 1), applied: make(chan *rules.Set, 64)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	td := spiffeid.RequireTrustDomainFromString("example.org")
	go func() {
		done <- reloadOnHUP(ctx, h.hup, td, configured, func(s *rules.Set) { h.applied <- s }, func() (config.Config, error) {
			h.reads.Add(1)
			return (*h.next.Load())()
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reloadOnHUP: %v", err)
		}
	})
	return h
}

func (h *reloadHarness) serve(cfg config.Config, err error) {
	f := func() (config.Config, error) { return cfg, err }
	h.next.Store(&f)
}

// signal delivers n SIGHUPs as a storm does: some are merged by the
// channel, as signal.Notify merges them.
func (h *reloadHarness) signal(n int) {
	for range n {
		select {
		case h.hup <- syscall.SIGHUP:
		default:
		}
		time.Sleep(time.Millisecond)
	}
}

// settled waits until a reload has had time to run and reports whether one
// applied rules.
func (h *reloadHarness) settled(t *testing.T) *rules.Set {
	t.Helper()
	select {
	case s := <-h.applied:
		return s
	case <-time.After(3 * reloadSettle):
		return nil
	}
}

func TestReloadNeverWidensAccess(t *testing.T) {
	withSVIDs := config.Default()
	withSVIDs.SVIDs = []rules.SVID{{SPIFFEID: "/a", Rules: []rules.Rule{{Match: map[string]string{"unix.uid": "1"}}}}}
	for _, tc := range []struct {
		name       string
		configured bool
		cfg        config.Config
		err        error
		wantApply  bool
	}{
		{"valid svids apply", true, withSVIDs, nil, true},
		{"no svids after svids is refused", true, config.Default(), nil, false},
		{"no svids stays default", false, config.Default(), nil, true},
		{"unreadable keeps the rules", true, config.Config{}, config.ErrEmpty, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := startReload(t, tc.configured)
			h.serve(tc.cfg, tc.err)
			h.signal(1)
			if got := h.settled(t); (got != nil) != tc.wantApply {
				t.Fatalf("applied %v, want applied=%v", got, tc.wantApply)
			}
		})
	}
}

func TestReloadStormCoalesces(t *testing.T) {
	h := startReload(t, true)
	cfg := config.Default()
	cfg.SVIDs = []rules.SVID{{SPIFFEID: "/a", Rules: []rules.Rule{{Match: map[string]string{"unix.uid": "1"}}}}}
	h.serve(cfg, nil)
	h.signal(50) // 50 signals within ~50 ms: one reload
	if h.settled(t) == nil {
		t.Fatal("the storm applied nothing")
	}
	if h.settled(t) != nil {
		t.Fatal("a second reload ran for one storm")
	}
	if n := h.reads.Load(); n != 1 {
		t.Fatalf("%d config reads for one storm, want 1", n)
	}
}

// Two agents started at once on one state dir: one runs, the other stops
// before it creates anything.
func TestOneAgentPerStateDir(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	type result struct {
		err     error
		started bool
	}
	results := make(chan result, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range 2 {
		cfg, err := config.FromArgs([]string{"--state-dir", state, "--workload-api-socket-dir", filepath.Join(t.TempDir(), fmt.Sprint("s", i))}, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			started, done := launch(ctx, cfg)
			select {
			case <-started:
				results <- result{started: true}
				<-done
			case err := <-done:
				results <- result{err: err}
			}
		}()
	}
	var ran, refused int
	for range 2 {
		select {
		case r := <-results:
			switch {
			case r.started:
				ran++
			case errors.Is(r.err, fsutil.ErrLocked):
				refused++
			default:
				t.Errorf("agent failed otherwise: %v", r.err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("agents neither started nor failed")
		}
	}
	if ran != 1 || refused != 1 {
		t.Fatalf("%d ran, %d refused; want one each", ran, refused)
	}
}
