package csi

import (
	"context"
	"net"
	"runtime/debug"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/unixsock"
)

// stopTimeout bounds the wait for CSI calls in flight at shutdown.
const stopTimeout = 5 * time.Second

// Serve serves the CSI Identity and Node services on the Unix socket
// socketPath until ctx is done. A stale socket file is removed first; a live
// server on it is an error (see unixsock.Listen). Call Reconcile before Serve.
func (d *Driver) Serve(ctx context.Context, socketPath string) error {
	ln, err := listenKubelet(socketPath)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(recoverUnary, logErrors, d.observeCalls))
	csipb.RegisterIdentityServer(srv, identityServer{d: d})
	csipb.RegisterNodeServer(srv, nodeServer{d: d})
	klog.InfoS("Serving CSI", "driver", d.name, "socket", socketPath, "node", d.nodeID)
	return unixsock.Serve(ctx, srv, ln, stopTimeout)
}

// listenKubelet opens a socket for the kubelet, the only client (root).
func listenKubelet(path string) (*net.UnixListener, error) {
	return unixsock.Listen(path, 0o600, 0o750)
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

// observeCalls tells Options.Observe of publishes and unpublishes.
func (d *Driver) observeCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	var op string
	switch info.FullMethod {
	case csipb.Node_NodePublishVolume_FullMethodName:
		op = "publish"
	case csipb.Node_NodeUnpublishVolume_FullMethodName:
		op = "unpublish"
	}
	if op == "" || d.observe == nil {
		return handler(ctx, req)
	}
	start := time.Now()
	resp, err := handler(ctx, req)
	d.observe(op, err, time.Since(start))
	return resp, err
}

func logErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod, "code", status.Code(err))
	}
	return resp, err
}
