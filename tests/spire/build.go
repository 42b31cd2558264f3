package spire

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Version is the github.com/spiffe/spire version the tools module pins.
func Version(ctx context.Context, toolsDir string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", "github.com/spiffe/spire")
	cmd.Dir = toolsDir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: the SPIRE version: %w", toolsDir, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// CacheDir is where builds are kept: ${XDG_CACHE_HOME:-$HOME/.cache}/csi-agent-spire.
func CacheDir() (string, error) {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "csi-agent-spire"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, ".cache", "csi-agent-spire"), nil
}

// Build builds spire-server and spire-agent from the tools module into
// cacheDir/<version>/, or returns the ones already there. It reports how
// long the build took (zero on a cache hit).
func Build(ctx context.Context, toolsDir, cacheDir string, logf func(string, ...any)) (server, agent string, took time.Duration, err error) {
	version, err := Version(ctx, toolsDir)
	if err != nil {
		return "", "", 0, err
	}
	dir := filepath.Join(cacheDir, version)
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	if isFile(server) && isFile(agent) {
		return server, agent, 0, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", "", 0, err
	}
	// One build at a time: `make test` starts one in the background (make
	// spire-prebuild) and the interop test waits for it here, then finds it.
	unlock, err := lockFile(ctx, filepath.Join(cacheDir, version+".lock"), logf)
	if err != nil {
		return "", "", 0, err
	}
	defer unlock()
	if isFile(server) && isFile(agent) {
		return server, agent, 0, nil
	}
	tmp, err := os.MkdirTemp(cacheDir, "build-")
	if err != nil {
		return "", "", 0, err
	}
	defer os.RemoveAll(tmp)
	logf("building spire-server and spire-agent %s (cold: minutes on 2 cores)", version)
	start := time.Now()
	// SPIRE's SQLite datastore is cgo (mattn/go-sqlite3): CGO stays on.
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", tmp+"/",
		"github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent")
	cmd.Dir = toolsDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", 0, fmt.Errorf("build SPIRE %s: %w\n%s", version, err, out)
	}
	took = time.Since(start)
	// A finished build appears at once or not at all.
	if err := os.Rename(tmp, dir); err != nil {
		return "", "", 0, err
	}
	return server, agent, took, nil
}

// BuildAgent builds csi-agent from the repository root into dir.
func BuildAgent(ctx context.Context, repoRoot, dir string) (string, error) {
	bin := filepath.Join(dir, "csi-agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, "./cmd/csi-agent")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build csi-agent: %w\n%s", err, out)
	}
	return bin, nil
}

// lockFile takes an exclusive flock on path, waiting for another holder
// until ctx ends.
func lockFile(ctx context.Context, path string, logf func(string, ...any)) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for waited := false; ; waited = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !waited {
			logf("waiting for the SPIRE build in progress (%s)", path)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
