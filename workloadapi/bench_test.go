package workloadapi

import (
	"context"
	"sort"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
)

func reportPercentiles(b *testing.B, d []time.Duration) {
	if len(d) == 0 {
		return
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	b.ReportMetric(float64(d[len(d)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(d[len(d)*99/100].Microseconds()), "p99-us")
}

// BenchmarkNewConnectionFirstX509SVID: dial a new connection, open the X.509
// stream, receive the first message (warm SVID cache), close.
func BenchmarkNewConnectionFirstX509SVID(b *testing.B) {
	a := startAgent(b, agentConfig{svids: defaultSVIDs()})
	ctx := withHeader(context.Background())
	first := func() time.Duration {
		start := time.Now()
		conn, err := dialRaw(a.socket)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(sctx, &workloadpb.X509SVIDRequest{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	first() // warm the cache
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		lat = append(lat, first())
	}
	b.StopTimer()
	reportPercentiles(b, lat)
}

// BenchmarkFetchJWTSVID16Clients: 16 connections calling FetchJWTSVID in a loop.
func BenchmarkFetchJWTSVID16Clients(b *testing.B) {
	a := startAgent(b, agentConfig{svids: defaultSVIDs()})
	ctx := withHeader(context.Background())
	b.SetParallelism(8) // 8 × GOMAXPROCS(2) = 16 clients
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		conn, err := dialRaw(a.socket)
		if err != nil {
			b.Error(err)
			return
		}
		defer conn.Close()
		c := workloadpb.NewSpiffeWorkloadAPIClient(conn)
		for pb.Next() {
			if _, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"bench"}}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "rps")
}
