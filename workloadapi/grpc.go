package workloadapi

import (
	"runtime"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/csi-agent/csi-agent/internal/peer"
)

// Limits are the server's bounds; internal/config owns their defaults.
type Limits struct {
	Connections          peer.Limits
	Callers              CallerLimits
	StreamsPerConnection uint32
	MaxRequestBytes      int
	HandshakeTimeout     time.Duration
	IdleTimeout          time.Duration
}

// NewGRPCServer returns a gRPC server that reads each client's kernel peer
// credentials at accept, serves the Workload API, Envoy's SDS, a health
// service (which carries no identity data, for probes) and gRPC reflection
// (service schemas only, for grpcurl; SPIRE serves it too). Idle streams
// are most of what a node holds open, so per-connection memory is cut where
// grpc-go allows: no read buffer (the framer reads the socket directly; a Unix
// socket read is cheap), no HPACK dynamic table for request headers, and a
// small write buffer shared between connections. What remains per
// connection is grpc-go's own: four goroutine stacks (reader, writer,
// keepalive, handler) and its transport state; BENCHMARKS.md has numbers.
//
// Limits bound what callers can make it hold: connections (counted at the
// handshake, per caller and in all, with a reserve for callers that hold an
// identity), streams (per connection, per caller, in all), request size,
// idle and handshake time, and denied calls per caller. Every refusal, of
// a call or of a connection at the handshake, is counted in the Server's
// Metrics and logged (rate limited per caller).
func NewGRPCServer(s *Server, l Limits) (*grpc.Server, *health.Server) {
	gd := newGuard(l.Callers)
	if s.metrics != nil { // nil: a Server built without New (tests)
		gd.metrics, gd.refusals = s.metrics, s.refusals
	}
	conns := l.Connections
	conns.Refused = gd.connectionRefused(conns.Refused)
	opts := []grpc.ServerOption{
		grpc.Creds(peer.Credentials(conns)),
		grpc.ChainUnaryInterceptor(gd.unary),
		grpc.ChainStreamInterceptor(gd.stream),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: l.IdleTimeout}),
	}
	// Zero leaves grpc-go's own value (tests); the agent sets every one.
	if l.StreamsPerConnection > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(l.StreamsPerConnection))
	}
	if l.MaxRequestBytes > 0 {
		opts = append(opts, grpc.MaxRecvMsgSize(l.MaxRequestBytes))
	}
	if l.HandshakeTimeout > 0 {
		opts = append(opts, grpc.ConnectionTimeout(l.HandshakeTimeout))
	}
	g := grpc.NewServer(append(opts,
		grpc.ReadBufferSize(0),
		grpc.HeaderTableSize(0),
		grpc.WriteBufferSize(4<<10),
		grpc.SharedWriteBuffer(true),
		grpc.InitialWindowSize(64<<10),
		grpc.InitialConnWindowSize(64<<10),
		// Reused handler goroutines keep their grown stacks for the next RPC.
		grpc.NumStreamWorkers(uint32(4*runtime.NumCPU())),
	)...)
	s.Register(g)
	s.RegisterSDS(g)
	h := health.NewServer()
	healthpb.RegisterHealthServer(g, h)
	reflection.Register(g)
	return g, h
}
