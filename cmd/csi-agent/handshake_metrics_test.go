package main

import (
	"context"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/peer"
)

// A connection refused at the handshake (over the per-caller limit) moves
// the denial counter of that reason by exactly one, and nothing else.
func TestHandshakeRefusalCounted(t *testing.T) {
	const perCaller = 2
	a := startMetricsAgent(t, func(c *config.Config) { c.WorkloadAPI.Limits.MaxConnectionsPerCaller = perCaller })
	waitReadyz(t, a.base, http.StatusOK)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Fill this caller's allowance with connections that are served.
	for range perCaller {
		conn, err := grpc.NewClient("unix://"+a.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("health check within the limit: %v", err)
		}
	}
	families := append(slices.Clone(trafficFamilies), denialsFamily)
	before := values(scrape(t, a.base), families...)
	// One raw connection past the limit, so no client retries it: the
	// agent closes it at the handshake.
	c, err := net.Dial("unix", a.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 64)); err == nil || isTimeout(err) {
		t.Fatalf("connection over the per-caller limit: read %d bytes, %v; want it closed", n, err)
	}
	after := values(scrape(t, a.base), families...)
	refused := series(denialsFamily, "reason", peer.RefusedCaller)
	for _, k := range slices.Sorted(seriesOf(before, after, map[string]float64{refused: 1})) {
		want := 0.0
		if k == refused {
			want = 1
		}
		if got := after[k] - before[k]; got != want {
			t.Errorf("%s moved by %v, want %v", k, got, want)
		}
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
