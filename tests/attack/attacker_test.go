package attack

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The attacker runs in a child process of the test binary, as another user:
// CSI_AGENT_ATTACK names the attack, CSI_AGENT_ATTACK_SOCKET the socket and
// CSI_AGENT_ATTACK_N its size. It prints one line "ready <counts>" once the
// attack is in place and holds everything open until its stdin closes.
const (
	attackEnv = "CSI_AGENT_ATTACK"
	socketEnv = "CSI_AGENT_ATTACK_SOCKET"
	sizeEnv   = "CSI_AGENT_ATTACK_N"
)

// http2Preface is what a client sends first, followed by an empty SETTINGS
// frame: a connection the server must set up and then hold.
var http2Preface = append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)

func runAttacker() {
	socket := os.Getenv(socketEnv)
	n, _ := strconv.Atoi(os.Getenv(sizeEnv))
	var report string
	var hold []func()
	switch os.Getenv(attackEnv) {
	case "idle-connections":
		var conns []net.Conn
		for range n {
			c, err := net.Dial("unix", socket)
			if err != nil {
				continue
			}
			if _, err := c.Write(http2Preface); err != nil {
				c.Close()
				continue
			}
			conns = append(conns, c)
		}
		// Count what the server still holds open after the handshake.
		time.Sleep(2 * time.Second)
		open := 0
		for _, c := range conns {
			_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
			buf := make([]byte, 4096)
			for {
				_, err := c.Read(buf)
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					open++
					break
				}
				if err != nil {
					break
				}
			}
		}
		report = fmt.Sprintf("dialed=%d open=%d", len(conns), open)
		hold = append(hold, func() {
			for _, c := range conns {
				c.Close()
			}
		})
	case "health-watch", "x509-streams":
		x509 := os.Getenv(attackEnv) == "x509-streams"
		const perConn = 16
		var served, refused atomic.Int64
		var wg sync.WaitGroup
		ctx, cancel := context.WithCancel(context.Background())
		hold = append(hold, cancel)
		for i := 0; i < n; i += perConn {
			cc, err := dial(socket)
			if err != nil {
				continue
			}
			hold = append(hold, func() { cc.Close() })
			for range min(perConn, n-i) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					// A stream the server never answers is given up after a
					// while; one it answers stays open until the end.
					sctx, scancel := context.WithCancel(ctx)
					giveUp := time.AfterFunc(20*time.Second, scancel)
					var err error
					if x509 {
						var s grpc.ServerStreamingClient[workloadpb.X509SVIDResponse]
						if s, err = workloadpb.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(withHeader(sctx), &workloadpb.X509SVIDRequest{}); err == nil {
							_, err = s.Recv()
						}
					} else {
						var s grpc.ServerStreamingClient[healthpb.HealthCheckResponse]
						if s, err = healthpb.NewHealthClient(cc).Watch(sctx, &healthpb.HealthCheckRequest{}); err == nil {
							_, err = s.Recv()
						}
					}
					giveUp.Stop()
					if err == nil {
						served.Add(1)
					} else {
						refused.Add(1)
					}
				}()
			}
		}
		waitTimeout(&wg, 30*time.Second)
		report = fmt.Sprintf("served=%d refused=%d", served.Load(), refused.Load())
	case "denied-flood":
		cc, err := dial(socket)
		if err != nil {
			report = "dial failed: " + err.Error()
			break
		}
		hold = append(hold, func() { cc.Close() })
		client := workloadpb.NewSpiffeWorkloadAPIClient(cc)
		counts := map[codes.Code]int{}
		deadline := time.Now().Add(time.Duration(n) * time.Millisecond)
		for time.Now().Before(deadline) {
			_, err := client.FetchJWTSVID(withHeader(context.Background()), &workloadpb.JWTSVIDRequest{Audience: []string{"x"}})
			counts[status.Code(err)]++
		}
		report = fmt.Sprintf("denied=%d exhausted=%d other=%d", counts[codes.PermissionDenied], counts[codes.ResourceExhausted],
			total(counts)-counts[codes.PermissionDenied]-counts[codes.ResourceExhausted])
	default:
		report = "unknown attack"
	}
	fmt.Println("ready", report)
	// Hold until the test closes our stdin.
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	for _, f := range hold {
		f()
	}
	os.Exit(0)
}

func total(m map[codes.Code]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

func dial(socket string) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///agent", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}))
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}
