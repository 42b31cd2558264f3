package workloadapi

import (
	"runtime"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/csi-agent/csi-agent/internal/peer"
)

// NewGRPCServer returns a gRPC server that reads each client's kernel peer
// credentials at accept, serves the Workload API and a health service
// (which carries no identity data, for probes). Idle streams are most of
// what a node holds open, so per-connection memory is cut where grpc-go
// allows: no read buffer (the framer reads the socket directly; a Unix
// socket read is cheap), no HPACK dynamic table for request headers, and a
// small write buffer shared between connections. What remains per
// connection is grpc-go's own: four goroutine stacks (reader, writer,
// keepalive, handler) and its transport state; BENCHMARKS.md has numbers.
func NewGRPCServer(s *Server) (*grpc.Server, *health.Server) {
	g := grpc.NewServer(
		grpc.Creds(peer.Credentials()),
		grpc.ReadBufferSize(0),
		grpc.HeaderTableSize(0),
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
