package peer

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestCredentialsGRPCRoundTrip(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "grpc.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}

	type seen struct {
		info  Info
		ok    bool
		alive error
	}
	seenc := make(chan seen, 1)
	srv := grpc.NewServer(
		grpc.Creds(Credentials(Limits{})),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			info, ok := FromContext(ctx)
			s := seen{info: info, ok: ok}
			if ok {
				s.alive = info.Alive()
			}
			seenc <- s
			return h(ctx, req)
		}),
	)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(l)
	t.Cleanup(srv.Stop)

	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("Check: %v", err)
	}
	s := <-seenc
	if !s.ok {
		t.Fatal("FromContext found no peer Info")
	}
	if int(s.info.PID) != os.Getpid() || s.info.UID != uint32(os.Geteuid()) || s.info.GID != uint32(os.Getegid()) {
		t.Errorf("Info = %+v, want pid %d uid %d gid %d", s.info, os.Getpid(), os.Geteuid(), os.Getegid())
	}
	if s.alive != nil {
		t.Errorf("Alive: %v", s.alive)
	}
}

func TestFromContextWithoutPeer(t *testing.T) {
	if _, ok := FromContext(context.Background()); ok {
		t.Fatal("FromContext found Info in a bare context")
	}
}

func TestServerHandshakeReleasesHandleOnClose(t *testing.T) {
	server, client := unixPair(t)
	defer client.Close()
	conn, ai, err := Credentials(Limits{}).ServerHandshake(server)
	if err != nil {
		t.Fatal(err)
	}
	info := ai.(AuthInfo).Info
	if ai.AuthType() != AuthType {
		t.Errorf("AuthType = %q", ai.AuthType())
	}
	if err := info.Alive(); err != nil {
		t.Fatalf("Alive: %v", err)
	}
	if err := conn.Close(); err != nil {
		t.Fatal(err)
	}
	if err := info.Alive(); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("Alive after conn Close = %v, want ErrProcessGone", err)
	}
}

func TestCloseConnectionDropsTheClient(t *testing.T) {
	server, client := unixPair(t)
	defer client.Close()
	conn, ai, err := Credentials(Limits{}).ServerHandshake(server)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := ai.(AuthInfo).Info.CloseConnection(); err != nil {
		t.Fatal(err)
	}
	if n, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatalf("client read %d bytes from a closed connection", n)
	}
	if err := (Info{}).CloseConnection(); err != nil {
		t.Errorf("CloseConnection on a bare Info: %v", err)
	}
}

func TestServerHandshakeRejectsTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, _, err := Credentials(Limits{}).ServerHandshake(s); err == nil {
		t.Fatal("ServerHandshake accepted a TCP connection")
	}
}

func TestClientHandshakeUnsupported(t *testing.T) {
	server, client := unixPair(t)
	defer server.Close()
	defer client.Close()
	if _, _, err := Credentials(Limits{}).ClientHandshake(context.Background(), "x", client); err == nil {
		t.Fatal("ClientHandshake succeeded")
	}
}

func TestCredentialsClone(t *testing.T) {
	c := Credentials(Limits{})
	if c.Clone().Info().SecurityProtocol != AuthType || c.Info().SecurityProtocol != AuthType {
		t.Fatal("unexpected protocol info")
	}
}

// unixPair returns both ends of a real Unix socket connection.
func unixPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err = net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return server, client
}

func BenchmarkServerHandshake(b *testing.B) {
	l, err := net.Listen("unix", filepath.Join(b.TempDir(), "s.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer server.Close()
	creds := Credentials(Limits{})
	b.ReportAllocs()
	for b.Loop() {
		_, ai, err := creds.ServerHandshake(server)
		if err != nil {
			b.Fatal(err)
		}
		ai.(AuthInfo).Info.Close()
	}
}
