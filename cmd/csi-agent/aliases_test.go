package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/csi-agent/csi-agent/internal/config"
)

// SPIRE's alternate socket names: go-spiffe reaches the agent through each
// and gets the same identity as through the socket; a deleted alias comes
// back; the aliases go with the agent.
func TestSocketAliasesServeTheSameIdentity(t *testing.T) {
	aliases := []string{"socket", "api.sock"}
	var dir string
	// Registered first, so it runs after the agent has stopped.
	t.Cleanup(func() {
		for _, n := range aliases {
			if _, err := os.Lstat(filepath.Join(dir, n)); !os.IsNotExist(err) {
				t.Errorf("alias %s left after the agent stopped: %v", n, err)
			}
		}
	})
	a := startMetricsAgent(t, func(c *config.Config) {
		c.WorkloadAPI.SocketName = "spire-agent.sock"
		c.WorkloadAPI.SocketAliases = aliases
	})
	dir = filepath.Dir(a.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fetch := func(name string) string {
		t.Helper()
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+filepath.Join(dir, name)))
		if err != nil {
			t.Fatalf("FetchX509SVID through %s: %v", name, err)
		}
		return svid.ID.String()
	}
	want := fetch("spire-agent.sock")
	for _, n := range aliases {
		if got := fetch(n); got != want {
			t.Errorf("through %s: %s, through the socket: %s", n, got, want)
		}
		if target, err := os.Readlink(filepath.Join(dir, n)); err != nil || target != "spire-agent.sock" {
			t.Errorf("alias %s -> %q, %v; want the relative spire-agent.sock (it must resolve in a pod's mount)", n, target, err)
		}
	}
	if err := os.Remove(filepath.Join(dir, "api.sock")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Lstat(filepath.Join(dir, "api.sock")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a deleted alias was not re-created")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := fetch("api.sock"); got != want {
		t.Errorf("through the re-created api.sock: %s, want %s", got, want)
	}
}
