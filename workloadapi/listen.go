package workloadapi

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/csi-agent/csi-agent/internal/peer"
)

// ErrSocketInUse means another live process serves the socket.
var ErrSocketInUse = errors.New("socket is served by a live process")

// Listen creates dir (0755, so pods can traverse it) and a world-connectable
// Unix socket in it. Attestation, not file permissions, decides who gets an
// identity. A stale socket file left by a dead agent is replaced; a socket a
// live process answers on is never taken over.
func Listen(dir, name string) (*net.UnixListener, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	path := filepath.Join(dir, name)
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Remove the file when the listener closes, but only if it is still ours.
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o777); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return l, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("%s: %w (is another agent running?)", path, ErrSocketInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("probe %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// NewGRPCServer returns a gRPC server that reads each client's kernel peer
// credentials at accept, serves the Workload API and a health service
// (which carries no identity data, for probes). Buffers are kept small and
// the write buffer shared so that thousands of idle streams stay cheap.
func NewGRPCServer(s *Server) (*grpc.Server, *health.Server) {
	g := grpc.NewServer(
		grpc.Creds(peer.Credentials()),
		grpc.ReadBufferSize(4<<10),
		grpc.WriteBufferSize(4<<10),
		grpc.SharedWriteBuffer(true),
		grpc.InitialWindowSize(64<<10),
		grpc.InitialConnWindowSize(64<<10),
		// Reused handler goroutines keep their grown stacks for the next RPC.
		grpc.NumStreamWorkers(uint32(4*runtime.NumCPU())),
	)
	s.Register(g)
	h := health.NewServer()
	healthpb.RegisterHealthServer(g, h)
	return g, h
}
