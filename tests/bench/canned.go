package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
)

// cannedServer answers FetchX509SVID with one fixed SVID and holds the
// stream open, doing nothing else: the memory floor of a gRPC server with
// that many streams, to compare the agent with.
type cannedServer struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer
	resp *workloadpb.X509SVIDResponse
}

func (c *cannedServer) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream grpc.ServerStreamingServer[workloadpb.X509SVIDResponse]) error {
	if err := stream.Send(c.resp); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// runCanned serves sock until killed; tuned applies the agent's buffer
// settings (those of workloadapi.NewGRPCServer), else grpc-go's defaults.
func runCanned(sock string, tuned bool) error {
	signal.Ignore(syscall.SIGHUP) // the RSS phase sends one
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	id, _ := url.Parse("spiffe://example.org/canned")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), URIs: []*url.URL{id}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	var opts []grpc.ServerOption
	if tuned {
		opts = append(opts, grpc.ReadBufferSize(0), grpc.HeaderTableSize(0), grpc.WriteBufferSize(4<<10), grpc.SharedWriteBuffer(true),
			grpc.InitialWindowSize(64<<10), grpc.InitialConnWindowSize(64<<10))
	}
	g := grpc.NewServer(opts...)
	workloadpb.RegisterSpiffeWorkloadAPIServer(g, &cannedServer{resp: &workloadpb.X509SVIDResponse{
		Svids: []*workloadpb.X509SVID{{SpiffeId: id.String(), X509Svid: der, X509SvidKey: keyDER, Bundle: der}},
	}})
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		return err
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	return g.Serve(lis)
}

// startCanned runs this executable as a canned server, like startAgent.
func startCanned(self string, tuned bool) (*agent, error) {
	dir, err := os.MkdirTemp("", "csi-agent-bench-canned-")
	if err != nil {
		return nil, err
	}
	a := &agent{dir: dir, sock: filepath.Join(dir, "sockets", "canned.sock")}
	args := []string{"-canned", a.sock}
	if tuned {
		args = append(args, "-canned-tuned")
	}
	if err := a.run(exec.Command(self, args...)); err != nil {
		return nil, err
	}
	return a, nil
}
