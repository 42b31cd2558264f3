package csi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

const (
	staleProbeTimeout = 500 * time.Millisecond
	gracefulStop      = 5 * time.Second
)

// Serve serves the CSI Identity and Node services on the Unix socket
// socketPath until ctx is done. A stale socket file is removed first; a live
// server on it is an error. Call Reconcile before Serve.
func (d *Driver) Serve(ctx context.Context, socketPath string) error {
	ln, err := listenUnix(socketPath)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(recoverUnary, logErrors))
	csipb.RegisterIdentityServer(srv, identityServer{d: d})
	csipb.RegisterNodeServer(srv, nodeServer{d: d})
	klog.InfoS("Serving CSI", "driver", d.name, "socket", socketPath, "node", d.nodeID)
	return serveUntil(ctx, srv, ln, socketPath)
}

// serveUntil runs srv on ln until ctx is done, then stops it and removes the
// socket file.
func serveUntil(ctx context.Context, srv *grpc.Server, ln net.Listener, socketPath string) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		_ = os.Remove(socketPath)
		return fmt.Errorf("serve on %s: %w", socketPath, err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(gracefulStop):
		srv.Stop()
	}
	<-errc
	_ = os.Remove(socketPath)
	return nil
}

// listenUnix listens on path, replacing a stale socket file but refusing to
// take over from a server that still answers.
func listenUnix(path string) (*net.UnixListener, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("socket path %q is not absolute", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("inspect %s: %w", path, err)
	case fi.Mode().Type() != fs.ModeSocket:
		return nil, fmt.Errorf("%s exists and is not a socket", path)
	default:
		c, err := net.DialTimeout("unix", path, staleProbeTimeout)
		if err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("a server is already listening on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Only the kubelet (root) talks to these sockets.
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// recoverUnary turns a panic into Internal: no input may crash the agent.
func recoverUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			klog.ErrorS(nil, "Panic in CSI handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			resp, err = nil, status.Error(codes.Internal, "internal error")
		}
	}()
	return handler(ctx, req)
}

func logErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod, "code", status.Code(err))
	}
	return resp, err
}
