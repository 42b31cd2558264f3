package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
)

// KeptOptions configure ServeKept.
type KeptOptions struct {
	// Listen makes the socket at Path (Listen or ListenVisible with the
	// caller's modes).
	Path   string
	Listen func() (*net.UnixListener, error)
	// Poll is how often the socket file is checked.
	Poll time.Duration
	// StopTimeout bounds the graceful stop.
	StopTimeout time.Duration
	// Up, if set, is told when the socket file goes missing and when it is
	// back; it may be called from ServeKept's goroutine only.
	Up func(up bool)
}

// ServeKept serves srv on the socket at opts.Path until ctx ends, then stops
// it gracefully. When the socket file is deleted or replaced (someone
// cleaned the directory), clients can no longer reach the server: the
// socket is made again and served by the same server. On stop the file is
// removed only while it is still the one we made.
func ServeKept(ctx context.Context, srv *grpc.Server, opts KeptOptions) error {
	if opts.Poll <= 0 || opts.StopTimeout <= 0 || opts.Listen == nil || opts.Path == "" {
		return errors.New("unixsock: ServeKept needs a path, a listen function, a poll interval and a stop timeout")
	}
	up := opts.Up
	if up == nil {
		up = func(bool) {}
	}
	var (
		mu      sync.Mutex
		retired = map[net.Listener]bool{} // closed by us: their Serve errors are expected
	)
	failed := make(chan error, 1)
	serve := func(ln net.Listener) {
		go func() {
			err := srv.Serve(ln)
			mu.Lock()
			expected := retired[ln]
			delete(retired, ln)
			mu.Unlock()
			if err != nil && !expected && !errors.Is(err, grpc.ErrServerStopped) {
				select {
				case failed <- fmt.Errorf("serve on %s: %w", opts.Path, err):
				default:
				}
			}
		}()
	}
	ln, ino, err := keptListen(opts)
	if err != nil {
		return err
	}
	serve(ln)
	up(true)
	isUp := true

	tick := time.NewTicker(opts.Poll)
	defer tick.Stop()
	for {
		select {
		case err := <-failed:
			GracefulStop(srv, opts.StopTimeout)
			removeIfSame(opts.Path, ino)
			return err
		case <-ctx.Done():
			mu.Lock()
			retired[ln] = true
			mu.Unlock()
			GracefulStop(srv, opts.StopTimeout)
			removeIfSame(opts.Path, ino)
			return nil
		case <-tick.C:
		}
		if cur, err := inodeOf(opts.Path); err == nil && cur == ino {
			continue
		}
		if isUp {
			klog.InfoS("Socket file is gone or replaced; re-creating it", "socket", opts.Path)
			up(false)
			isUp = false
		}
		newLn, newIno, err := keptListen(opts)
		if err != nil {
			klog.ErrorS(err, "Re-creating the socket failed; will retry", "socket", opts.Path)
			continue
		}
		mu.Lock()
		retired[ln] = true
		mu.Unlock()
		_ = ln.Close()
		ln, ino = newLn, newIno
		serve(ln)
		up(true)
		isUp = true
		klog.InfoS("Re-created the socket", "socket", opts.Path)
	}
}

// keptListen listens and records the file's inode; the listener never
// unlinks on close, as the path may hold someone else's file by then.
func keptListen(opts KeptOptions) (*net.UnixListener, uint64, error) {
	ln, err := opts.Listen()
	if err != nil {
		return nil, 0, err
	}
	ln.SetUnlinkOnClose(false)
	ino, err := inodeOf(opts.Path)
	if err != nil {
		_ = ln.Close()
		return nil, 0, fmt.Errorf("stat %s: %w", opts.Path, err)
	}
	return ln, ino, nil
}

func inodeOf(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func removeIfSame(path string, ino uint64) {
	if cur, err := inodeOf(path); err == nil && cur == ino {
		_ = os.Remove(path)
	}
}
