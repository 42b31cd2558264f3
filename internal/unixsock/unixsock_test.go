package unixsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// staleSocket leaves a socket file nobody listens on, as a killed process does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
}

// liveSocket serves path until the test ends.
func liveSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
}

// slowSocket listens on path with a full backlog and never accepts, so a
// connect is not refused but does not complete either: a live server that
// is merely busy.
func slowSocket(t *testing.T, path string) {
	t.Helper()
	lfd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(lfd) })
	if err := syscall.Bind(lfd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(lfd, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		cfd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Close(cfd) })
		err = syscall.Connect(cfd, &syscall.SockaddrUnix{Name: path})
		if errors.Is(err, syscall.EAGAIN) {
			return
		}
		if err != nil {
			t.Fatalf("filling the backlog: %v", err)
		}
		if i > 100 {
			t.Fatal("backlog never filled")
		}
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func TestListen(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, path string)
		wantErr string // "" for success
		wantIs  error
		// keep: the file found at path must survive a failed Listen.
		keep bool
	}{
		{name: "fresh", setup: func(*testing.T, string) {}},
		{name: "stale socket replaced", setup: staleSocket},
		{name: "live server refused", setup: liveSocket, wantErr: "already listening", wantIs: ErrInUse, keep: true},
		{name: "slow server keeps its socket", setup: slowSocket, wantErr: "not removing", keep: true},
		{name: "regular file refused", setup: func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "not a socket", keep: true},
		{name: "directory refused", setup: func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "not a socket", keep: true},
		{name: "symlink to a stale socket refused", setup: func(t *testing.T, path string) {
			target := path + ".target"
			staleSocket(t, target)
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}, wantErr: "not a socket", keep: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "run")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "s.sock")
			tt.setup(t, path)
			var before uint64
			if tt.keep {
				before = inode(t, path)
			}
			ln, err := Listen(path, 0o600, 0o750)
			if tt.wantErr != "" {
				if err == nil {
					ln.Close()
					t.Fatal("Listen succeeded")
				}
				if !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), path) {
					t.Fatalf("err = %v, want it to name %s and say %q", err, path, tt.wantErr)
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Fatalf("err = %v, want %v", err, tt.wantIs)
				}
				if tt.wantIs == nil && errors.Is(err, ErrInUse) {
					t.Fatalf("err = %v wraps ErrInUse", err)
				}
				if got := inode(t, path); got != before {
					t.Fatalf("%s was replaced", path)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Lstat(path)
			if err != nil || fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
				t.Fatalf("socket mode %v, %v; want socket 0600", fi.Mode(), err)
			}
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatalf("dial the new listener: %v", err)
			}
			c.Close()
			if err := ln.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("socket left after Close: %v", err)
			}
		})
	}
}

func TestListenCreatesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	ln, err := Listen(filepath.Join(dir, "s.sock"), 0o777, 0o750)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	// The umask can only take bits away.
	if perm := fi.Mode().Perm(); perm&^0o750 != 0 || perm&0o700 != 0o700 {
		t.Fatalf("dir mode %v, want at most 0750", perm)
	}
	sfi, err := os.Lstat(filepath.Join(dir, "s.sock"))
	if err != nil || sfi.Mode().Perm() != 0o777 {
		t.Fatalf("socket mode %v, %v; want 0777 whatever the umask", sfi.Mode(), err)
	}
}

func TestListenRejectsRelativePath(t *testing.T) {
	t.Chdir(t.TempDir())
	ln, err := Listen("s.sock", 0o600, 0o750)
	if err == nil {
		ln.Close()
		t.Fatal("Listen accepted a relative path")
	}
	if !strings.Contains(err.Error(), "not absolute") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Lstat("s.sock"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a file was created: %v", err)
	}
}

// newHealthServer serves a health service on a fresh socket and returns a
// client for it.
func newHealthServer(t *testing.T) (*grpc.Server, *net.UnixListener, healthpb.HealthClient) {
	t.Helper()
	ln, err := Listen(filepath.Join(t.TempDir(), "grpc.sock"), 0o600, 0o700)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient("unix://"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return srv, ln, healthpb.NewHealthClient(cc)
}

func TestGracefulStop(t *testing.T) {
	tests := []struct {
		name    string
		hang    bool // open a stream that never ends
		timeout time.Duration
		// The stop must take at least min and at most max.
		min, max time.Duration
	}{
		{name: "idle server stops at once", timeout: time.Minute, max: 10 * time.Second},
		{name: "hanging stream is cut at the timeout", hang: true, timeout: 300 * time.Millisecond, min: 300 * time.Millisecond, max: 10 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, ln, client := newHealthServer(t)
			go srv.Serve(ln)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
				t.Fatal(err)
			}
			var stream healthpb.Health_WatchClient
			if tt.hang {
				var err error
				if stream, err = client.Watch(ctx, &healthpb.HealthCheckRequest{}); err != nil {
					t.Fatal(err)
				}
				// The first status proves the stream is open on the server.
				if _, err := stream.Recv(); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			GracefulStop(srv, tt.timeout)
			took := time.Since(start)
			if took < tt.min || took > tt.max {
				t.Fatalf("GracefulStop took %v, want between %v and %v", took, tt.min, tt.max)
			}
			if stream != nil {
				if _, err := stream.Recv(); err == nil {
					t.Fatal("the hanging stream survived the stop")
				}
			}
			if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(false)); err == nil {
				t.Fatal("server still answers after the stop")
			}
		})
	}
}

func TestServe(t *testing.T) {
	srv, ln, client := newHealthServer(t)
	path := ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, srv, ln, time.Second) }()
	cctx, ccancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer ccancel()
	if _, err := client.Check(cctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after the context ended: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Serve did not return after the context ended")
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left after Serve returned: %v", err)
	}
}

func TestServeReportsServeFailure(t *testing.T) {
	srv, ln, _ := newHealthServer(t)
	ln.Close()
	err := Serve(context.Background(), srv, ln, time.Second)
	if err == nil || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Fatalf("Serve on a closed listener = %v, want an error naming the socket", err)
	}
}

// A watcher that dials the moment the file appears must find it listening.
func TestListenVisibleAppearsListening(t *testing.T) {
	dir := t.TempDir()
	for i := range 50 {
		path := filepath.Join(dir, fmt.Sprintf("p%d.sock", i))
		dialed := make(chan error, 1)
		go func() {
			for {
				if _, err := os.Lstat(path); err == nil {
					c, err := net.Dial("unix", path)
					if err == nil {
						c.Close()
					}
					dialed <- err
					return
				}
			}
		}()
		ln, err := ListenVisible(path, 0o600, 0o700)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-dialed; err != nil {
			t.Fatalf("dial on appearance: %v", err)
		}
		ln.Close()
		if _, err := os.Lstat(path); err != nil {
			t.Fatalf("closing removed %s: the caller owns it", path)
		}
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("hidden socket %s left behind", e.Name())
		}
	}
	live := filepath.Join(dir, "live.sock")
	liveSocket(t, live)
	if _, err := ListenVisible(live, 0o600, 0o700); !errors.Is(err, ErrInUse) {
		t.Fatalf("ListenVisible over a live server: %v", err)
	}
}
