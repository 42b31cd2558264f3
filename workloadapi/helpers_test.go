package workloadapi

import (
	"context"
	"github.com/csi-agent/csi-agent/internal/testutil"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"

	unixattestor "github.com/csi-agent/csi-agent/attestor/unix"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/peer"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// testAgent is a Workload API server on a real Unix socket with the real CA,
// cache and Unix attestor.
type testAgent struct {
	server    *Server
	authority *ca.Authority
	cache     *svidcache.Cache
	socket    string
	stateDir  string
	stop      func()
}

type agentConfig struct {
	td          string
	svids       []rules.SVID
	stateDir    string // reused across restarts when set
	upstream    [2]string
	x509TTL     time.Duration
	federation  []federation.Source
	interceptor grpc.StreamServerInterceptor
	unary       grpc.UnaryServerInterceptor
	notReady    bool
}

// publicTempDir makes a directory other uids can traverse, for tests whose
// children drop privileges.
func publicTempDir(t testing.TB) string { return testutil.PublicTempDir(t, "wlapi-") }

func uidRule(id, uid string) rules.SVID {
	return rules.SVID{SPIFFEID: id, Rules: []rules.Rule{{Match: map[string]string{"unix.uid": uid}}}}
}

func startAgent(t testing.TB, cfg agentConfig) *testAgent {
	t.Helper()
	if cfg.td == "" {
		cfg.td = "example.org"
	}
	td := spiffeid.RequireTrustDomainFromString(cfg.td)
	if cfg.stateDir == "" {
		cfg.stateDir = t.TempDir()
	}
	if cfg.x509TTL == 0 {
		cfg.x509TTL = time.Hour
	}
	ctx, cancel := context.WithCancel(context.Background())
	auth, err := ca.New(ctx, ca.Options{
		TrustDomain:      td,
		StateDir:         filepath.Join(cfg.stateDir, "ca"),
		UpstreamCertFile: cfg.upstream[0],
		UpstreamKeyFile:  cfg.upstream[1],
		X509SVIDTTL:      cfg.x509TTL,
		JWTSVIDTTL:       5 * time.Minute,
		IntermediateTTL:  24 * time.Hour,
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	cache := svidcache.New(auth, svidcache.Options{})
	set, err := rules.Compile(td, cfg.svids)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	fed, err := federation.New(cfg.federation, federation.Options{OwnTrustDomain: td, PollInterval: 50 * time.Millisecond})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	unix, err := unixattestor.New(unixattestor.Options{ProcRoot: "/proc", PasswdFile: "/etc/passwd", GroupFile: "/etc/group"})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	srv, err := New(Options{
		TrustDomain: td,
		Unix:        unix,
		Rules:       set,
		Bundle:      auth,
		SVIDs:       cache,
		Federation:  fed,
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	dir := publicTempDir(t)
	lis, err := Listen(dir, "agent.sock")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	opts := []grpc.ServerOption{grpc.Creds(peer.Credentials(peer.Limits{}))}
	if cfg.interceptor != nil {
		opts = append(opts, grpc.StreamInterceptor(cfg.interceptor))
	}
	if cfg.unary != nil {
		opts = append(opts, grpc.UnaryInterceptor(cfg.unary))
	}
	g := grpc.NewServer(opts...)
	srv.Register(g)
	srv.RegisterSDS(g)
	go func() { _ = auth.Run(ctx) }()
	go func() { _ = cache.Run(ctx) }()
	go func() { _ = fed.Run(ctx) }()
	go func() { _ = g.Serve(lis) }()
	srv.SetReady(!cfg.notReady)
	a := &testAgent{server: srv, authority: auth, cache: cache, socket: filepath.Join(dir, "agent.sock"), stateDir: cfg.stateDir}
	stopped := false
	a.stop = func() {
		if stopped {
			return
		}
		stopped = true
		g.Stop()
		cancel()
	}
	t.Cleanup(a.stop)
	return a
}

func (a *testAgent) addr() string { return "unix://" + a.socket }

// rawClient dials the socket with plain gRPC, for calls go-spiffe would not make.
func rawClient(t testing.TB, socket string) workloadpb.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := dialRaw(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return workloadpb.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

func dialRaw(socket string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}))
}
