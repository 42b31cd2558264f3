// Command bench measures the real csi-agent binary from outside, as a
// workload sees it: new connection → first X.509-SVID, FetchJWTSVID
// throughput with concurrent clients, and the agent's RSS idle and with many
// open X.509 streams. Traffic stays on a Unix socket in a temp dir.
//
//	go run ./tests/bench [-n 2000] [-clients 16] [-duration 5s] [-streams 1000]
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

func main() {
	n := flag.Int("n", 2000, "new-connection samples")
	clients := flag.Int("clients", 16, "concurrent FetchJWTSVID clients")
	duration := flag.Duration("duration", 5*time.Second, "FetchJWTSVID run time")
	streams := flag.Int("streams", 1000, "open X.509 streams for the RSS measurement")
	flag.Parse()
	if err := run(*n, *clients, *duration, *streams); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(n, clients int, duration time.Duration, streams int) error {
	dir, err := os.MkdirTemp("", "csi-agent-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "csi-agent")
	build := exec.Command("go", "build", "-o", bin, "./cmd/csi-agent")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build agent: %w", err)
	}
	sockDir := filepath.Join(dir, "sockets")
	agent := exec.Command(bin, "run", "--dev", "--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", sockDir, "-v=0", "--logtostderr=false", "--log_file", filepath.Join(dir, "agent.log"))
	if err := agent.Start(); err != nil {
		return err
	}
	defer func() {
		_ = agent.Process.Kill()
		_ = agent.Wait()
	}()
	sock := filepath.Join(sockDir, "agent.sock")
	if err := waitForSocket(sock, 20*time.Second); err != nil {
		return err
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")
	pid := agent.Process.Pid

	// Warm the SVID cache; we measure the per-connection path, not minting.
	for i := 0; i < 50; i++ {
		if _, err := firstSVIDRaw(ctx, sock); err != nil {
			return err
		}
	}
	raw, err := sample(n, func() (time.Duration, error) { return firstSVIDRaw(ctx, sock) })
	if err != nil {
		return err
	}
	gs, err := sample(n/4, func() (time.Duration, error) {
		start := time.Now()
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := workloadapi.FetchX509SVID(c, workloadapi.WithAddr("unix://"+sock))
		return time.Since(start), err
	})
	if err != nil {
		return err
	}
	idle := rssKiB(pid)

	rps, jwtLat, err := jwtThroughput(ctx, sock, clients, duration)
	if err != nil {
		return err
	}
	afterJWT := rssKiB(pid)

	closeStreams, err := openStreams(ctx, sock, streams)
	if err != nil {
		return err
	}
	time.Sleep(time.Second)
	withStreams := rssKiB(pid)
	closeStreams()

	fmt.Printf("| metric | value |\n|---|---|\n")
	fmt.Printf("| new connection → first X.509-SVID, raw gRPC (n=%d) | p50 %s, p99 %s |\n", n, pct(raw, 50), pct(raw, 99))
	fmt.Printf("| new connection → first X.509-SVID, go-spiffe FetchX509SVID incl. parsing (n=%d) | p50 %s, p99 %s |\n", n/4, pct(gs, 50), pct(gs, 99))
	fmt.Printf("| FetchJWTSVID, %d clients, %s | %.0f rps, p50 %s, p99 %s |\n", clients, duration, rps, pct(jwtLat, 50), pct(jwtLat, 99))
	fmt.Printf("| agent RSS idle (after the latency runs) | %.1f MiB |\n", float64(idle)/1024)
	fmt.Printf("| agent RSS after the JWT run | %.1f MiB |\n", float64(afterJWT)/1024)
	fmt.Printf("| agent RSS with %d open X.509 streams (one connection each) | %.1f MiB |\n", streams, float64(withStreams)/1024)
	return nil
}

func waitForSocket(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("agent socket %s did not appear", path)
}

func dial(sock string) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///agent", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}))
}

func firstSVIDRaw(ctx context.Context, sock string) (time.Duration, error) {
	start := time.Now()
	conn, err := dial(sock)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	if err != nil {
		return 0, err
	}
	if _, err := stream.Recv(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func sample(n int, f func() (time.Duration, error)) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		d, err := f()
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

func jwtThroughput(ctx context.Context, sock string, clients int, d time.Duration) (float64, []time.Duration, error) {
	var (
		total atomic.Int64
		mu    sync.Mutex
		lats  []time.Duration
		wg    sync.WaitGroup
		first atomic.Pointer[error]
	)
	deadline := time.Now().Add(d)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := dial(sock)
			if err != nil {
				first.CompareAndSwap(nil, &err)
				return
			}
			defer conn.Close()
			c := workloadpb.NewSpiffeWorkloadAPIClient(conn)
			local := make([]time.Duration, 0, 4096)
			for time.Now().Before(deadline) {
				start := time.Now()
				if _, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"bench"}}); err != nil {
					first.CompareAndSwap(nil, &err)
					return
				}
				local = append(local, time.Since(start))
			}
			total.Add(int64(len(local)))
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if p := first.Load(); p != nil {
		return 0, nil, *p
	}
	return float64(total.Load()) / d.Seconds(), lats, nil
}

func openStreams(ctx context.Context, sock string, n int) (func(), error) {
	ctx, cancel := context.WithCancel(ctx)
	var conns []*grpc.ClientConn
	closeAll := func() {
		cancel()
		for _, c := range conns {
			c.Close()
		}
	}
	for i := 0; i < n; i++ {
		conn, err := dial(sock)
		if err != nil {
			closeAll()
			return nil, err
		}
		conns = append(conns, conn)
		stream, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
		if err != nil {
			closeAll()
			return nil, err
		}
		if _, err := stream.Recv(); err != nil {
			closeAll()
			return nil, fmt.Errorf("stream %d: %w", i, err)
		}
	}
	return closeAll, nil
}

func pct(d []time.Duration, p int) string {
	if len(d) == 0 {
		return "n/a"
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	idx := (len(s) - 1) * p / 100
	return fmt.Sprintf("%.3f ms", float64(s[idx].Microseconds())/1000)
}

func rssKiB(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				v, _ := strconv.ParseInt(f[1], 10, 64)
				return v
			}
		}
	}
	return -1
}
