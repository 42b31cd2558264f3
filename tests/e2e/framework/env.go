package framework

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

// EnvOr returns the environment variable k, or def when it is unset or empty.
func EnvOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// CacheDir is where built Kubernetes binaries are kept, by version:
// $XDG_CACHE_HOME/csi-agent-e2e, else ~/.cache/csi-agent-e2e.
func CacheDir() string {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "csi-agent-e2e")
}

// Logger returns a Logf that writes timestamped lines, prefixed by name, to
// stderr (where go test -v interleaves them with the cases).
func Logger(name string) func(string, ...any) {
	return func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s %s: %s\n", time.Now().Format("15:04:05.000"), name, fmt.Sprintf(format, args...))
	}
}

// OnInterrupt calls teardown and exits 2 on SIGINT or SIGTERM, so that ^C
// or run.sh's kill still takes everything down in order.
func OnInterrupt(logf func(string, ...any), teardown func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		logf("interrupted: tearing down")
		teardown()
		os.Exit(2)
	}()
}
