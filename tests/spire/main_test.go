package spire

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// binaries are built once for every test.
type binaries struct {
	spireServer, spireAgent, csiAgent string
}

var bins binaries

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cache, err := CacheDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	start := time.Now()
	server, agent, took, err := Build(ctx, filepath.Join(wd, "tools"), cache, logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if took > 0 {
		logf("SPIRE built in %s (cold), cached in %s", took.Round(time.Second), filepath.Dir(server))
	} else {
		logf("SPIRE from the cache %s (%s)", filepath.Dir(server), time.Since(start).Round(time.Millisecond))
	}
	tmp, err := os.MkdirTemp("", "spire-interop-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	ours, err := BuildAgent(ctx, filepath.Join(wd, "..", ".."), tmp)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	bins = binaries{spireServer: server, spireAgent: agent, csiAgent: ours}
	return m.Run()
}
