package agent

import (
	"context"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/config"
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
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, Options{Version: "test", Started: func() { close(started) }}) }()
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

func TestRunStartsAndStops(t *testing.T) {
	// Kubernetes attestation through the kubelet's read-only port: the
	// default service-account token must not be required then.
	stop := startRun(t, "--kubernetes", "--cross-check", "off", "--kubelet-read-only-port", "10255")
	if err := stop(); err != nil {
		t.Fatalf("Run returned %v after cancel", err)
	}
}

func TestRunRefusesEnforceWithoutCSI(t *testing.T) {
	dir := t.TempDir()
	cfg, err := config.FromArgs([]string{"--kubernetes", "--node-name", "n", "--state-dir", filepath.Join(dir, "s"), "--workload-api-socket-dir", filepath.Join(dir, "w")}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	err = Run(context.Background(), cfg, Options{})
	if err == nil || !strings.Contains(err.Error(), "kubernetes.crossCheck") {
		t.Fatalf("Run: %v, want a kubernetes.crossCheck error", err)
	}
}
