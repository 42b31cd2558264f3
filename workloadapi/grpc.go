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
