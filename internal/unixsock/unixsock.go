// Package unixsock listens on Unix sockets and stops gRPC servers on them,
// with one policy for a socket file left behind by an earlier process: it is
// replaced only when nothing listens on it.
package unixsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

// ErrInUse means a live server answers on the socket.
var ErrInUse = errors.New("a server is already listening: the socket is served by a live process")

// probeTimeout bounds the dial that tells a stale socket from a live one.
const probeTimeout = time.Second

// Listen listens on the absolute path, creating its directory with dirMode
// and giving the socket mode. A socket file already there is removed only
// when connecting to it is refused (nobody listens); a server that answers
// gives an error wrapping ErrInUse, and any other dial failure (a slow
// server with a full backlog, no permission) is an error too: a live server
// must never lose its socket. Anything but a socket at path is refused. The
// file is removed when the listener closes.
func Listen(path string, mode, dirMode os.FileMode) (*net.UnixListener, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket path %q is not absolute", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, mode); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	c, err := net.DialTimeout("unix", path, probeTimeout)
	switch {
	case err == nil:
		_ = c.Close()
		return fmt.Errorf("%s: %w", path, ErrInUse)
	case errors.Is(err, syscall.ENOENT):
		// Removed since the Lstat: nothing to do.
		return nil
	case !errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("probe %s (not removing it): %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// GracefulStop stops srv gracefully, letting RPCs in flight finish, and
// stops it hard once timeout has passed: a stream that never ends must not
// hold up shutdown.
func GracefulStop(srv *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		srv.Stop()
		<-done
	}
}

// Serve serves srv on ln until ctx is done, then stops it with GracefulStop.
// It returns nil after a stop and an error if serving fails first. The
// listener is closed either way.
func Serve(ctx context.Context, srv *grpc.Server, ln net.Listener, timeout time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	GracefulStop(srv, timeout)
	<-errc
	return nil
}

// ListenVisible is Listen for sockets that a watcher dials as soon as the
// file appears (the kubelet's plugin watcher, which does not retry): the
// socket is made under a hidden name, which watchers ignore, and renamed to
// path once it accepts connections. Closing the listener leaves path in
// place; the caller removes it.
func ListenVisible(path string, mode, dirMode os.FileMode) (*net.UnixListener, error) {
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// Short, so that it fits sun_path wherever path does.
	hidden := filepath.Join(filepath.Dir(path), "."+strconv.FormatUint(uint64(rand.Uint32()), 36))
	ln, err := Listen(hidden, mode, dirMode)
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Rename(hidden, path); err != nil {
		_ = ln.Close()
		_ = os.Remove(hidden)
		return nil, fmt.Errorf("publish socket %s: %w", path, err)
	}
	return ln, nil
}
