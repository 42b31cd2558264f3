// Command bench measures the real csi-agent binary from outside, as a
// workload sees it. Traffic stays on Unix sockets in temp dirs.
//
// -mode classic (default): new connection → first X.509-SVID, FetchJWTSVID
// throughput with concurrent clients, and the agent's RSS idle and with many
// open X.509 streams:
//
//	go run ./tests/bench [-n 2000] [-clients 16] [-duration 5s] [-streams 1000]
//
// -mode streams (as root): per binary, first-SVID latency and RSS with
// -rss-streams open streams, then -rot-streams streams held by -identities
// client processes running as uids 20000.., with X.509-SVIDs of -ttl
// rotating -rotations times: agent CPU and read syscalls per rotation, and
// whether every stream received every rotation; -rot-streams 0 skips that,
// -floor adds a bare gRPC server's RSS (default and tuned buffers). -bins
// runs prebuilt
// binaries side by side, interleaved:
//
//	go run ./tests/bench -mode streams -bins old=/tmp/before/csi-agent,new=/tmp/new/csi-agent
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
	var (
		mode     = flag.String("mode", "classic", "classic or streams")
		binsFlag = flag.String("bins", "", "name=path,... of prebuilt agents to run side by side (default: build ./cmd/csi-agent as \"this\")")
		n        = flag.Int("n", 2000, "new-connection samples")
		clients  = flag.Int("clients", 16, "classic: concurrent FetchJWTSVID clients")
		duration = flag.Duration("duration", 5*time.Second, "classic: FetchJWTSVID run time")
		streams  = flag.Int("streams", 1000, "classic: open X.509 streams for the RSS measurement")
		cfg      streamsConfig
		client   = flag.Bool("client", false, "internal: run as a stream client process")
		sock     = flag.String("sock", "", "internal: the client's agent socket")
		cstreams = flag.Int("client-streams", 0, "internal: the client's stream count")
		cperconn = flag.Int("client-per-conn", 1, "internal: the client's streams per connection")
		canned   = flag.String("canned", "", "internal: serve a canned FetchX509SVID on this socket")
		ctuned   = flag.Bool("canned-tuned", false, "internal: the canned server uses the agent's gRPC buffer settings")
	)
	flag.IntVar(&cfg.rssStreams, "rss-streams", 5000, "streams: open streams for the RSS measurement")
	flag.IntVar(&cfg.rotStreams, "rot-streams", 10000, "streams: open streams while SVIDs rotate")
	flag.IntVar(&cfg.identities, "identities", 100, "streams: client processes, one uid and so one identity each")
	flag.DurationVar(&cfg.ttl, "ttl", time.Minute, "streams: X.509-SVID lifetime (renewed at half)")
	flag.IntVar(&cfg.rotations, "rotations", 3, "streams: half lives to measure")
	flag.IntVar(&cfg.perConn, "streams-per-conn", 0, "streams: streams per connection in the rotation phase (0: one, or as few as RLIMIT_NOFILE allows)")
	flag.BoolVar(&cfg.floor, "floor", false, "streams: also measure a bare gRPC server with canned responses, default and tuned buffers (RSS phase only)")
	flag.IntVar(&cfg.rounds, "rounds", 1, "streams: rounds over all binaries, order alternating")
	flag.Parse()
	cfg.n = *n

	var err error
	switch {
	case *client:
		err = runClient(*sock, *cstreams, *cperconn)
	case *canned != "":
		err = runCanned(*canned, *ctuned)
	case *mode == "classic":
		err = withBinaries(*binsFlag, func(bins []namedBin) error {
			for _, b := range bins {
				fmt.Printf("\n%s (%s):\n\n", b.name, b.path)
				if err := run(b.path, *n, *clients, *duration, *streams); err != nil {
					return err
				}
			}
			return nil
		})
	case *mode == "streams":
		err = withBinaries(*binsFlag, func(bins []namedBin) error { return runStreams(bins, cfg) })
	default:
		err = fmt.Errorf("unknown -mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type namedBin struct{ name, path string }

// withBinaries runs f with the binaries of -bins, or with the agent built
// from this tree.
func withBinaries(spec string, f func([]namedBin) error) error {
	bins, cleanup, err := binaries(spec)
	if err != nil {
		return err
	}
	defer cleanup()
	return f(bins)
}

func binaries(spec string) ([]namedBin, func(), error) {
	if spec == "" {
		dir, err := os.MkdirTemp("", "csi-agent-bench-build-")
		if err != nil {
			return nil, nil, err
		}
		cleanup := func() { os.RemoveAll(dir) }
		bin := filepath.Join(dir, "csi-agent")
		build := exec.Command("go", "build", "-o", bin, "./cmd/csi-agent")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			cleanup()
			return nil, nil, fmt.Errorf("build agent: %w", err)
		}
		return []namedBin{{"this", bin}}, cleanup, nil
	}
	var bins []namedBin
	for _, kv := range strings.Split(spec, ",") {
		name, path, ok := strings.Cut(kv, "=")
		if !ok || name == "" || path == "" {
			return nil, nil, fmt.Errorf("-bins: %q is not name=path", kv)
		}
		if _, err := os.Stat(path); err != nil {
			return nil, nil, fmt.Errorf("-bins: %w", err)
		}
		bins = append(bins, namedBin{name, path})
	}
	return bins, func() {}, nil
}

func run(bin string, n, clients int, duration time.Duration, streams int) error {
	a, err := startAgent(bin, false)
	if err != nil {
		return err
	}
	defer a.stop()
	sock, pid := a.sock, a.pid
	ctx := metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")

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
