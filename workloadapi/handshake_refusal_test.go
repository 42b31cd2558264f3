package workloadapi

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/peer"
)

// countingMetrics records denials by reason.
type countingMetrics struct {
	mu     sync.Mutex
	denied map[string]int
}

func (m *countingMetrics) Attested(string, string) {}
func (m *countingMetrics) StreamsOpen(int)         {}
func (m *countingMetrics) Denied(reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.denied[reason]++
}

func (m *countingMetrics) count(reason string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.denied[reason]
}

// A connection refused at the handshake is counted and logged with its
// reason and caller, as a refused call is, and within the caller's budget
// of lines.
func TestHandshakeRefusalCountedAndLogged(t *testing.T) {
	m := &countingMetrics{denied: map[string]int{}}
	a := startHolderAgentWith(t, nil, m, Limits{Connections: peer.Limits{PerCaller: 1}})
	var mu sync.Mutex
	var lines []string
	a.srv.refusals.out = func(msg string, kv ...any) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, fmt.Sprint(append([]any{msg}, kv...)...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The caller's one connection, served.
	c := rawClient(t, a.socket)
	// No rule matches: refused, and so logged, but past the handshake.
	if _, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("first connection: %v, want PermissionDenied from the handler", err)
	}
	const over = refusalBurst + 3
	for range over {
		conn, err := net.Dial("unix", a.socket)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := conn.Read(make([]byte, 64)); err == nil {
			t.Fatalf("connection over the per-caller limit read %d bytes; want it closed", n)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("connection over the per-caller limit left open")
		}
		conn.Close()
	}
	if got := m.count(peer.RefusedCaller); got != over {
		t.Errorf("denials{reason=%s} = %d, want %d", peer.RefusedCaller, got, over)
	}
	mu.Lock()
	defer mu.Unlock()
	// The call's refusal and the connections' share the caller's budget.
	var refused int
	for _, l := range lines {
		if strings.HasPrefix(l, refusedConnection) {
			refused++
			if !strings.Contains(l, peer.RefusedCaller) || !strings.Contains(l, fmt.Sprint("uid", os.Getuid())) {
				t.Errorf("log line %q: want the reason and the caller's uid", l)
			}
		}
	}
	if len(lines) != refusalBurst || refused != refusalBurst-1 {
		t.Errorf("%d lines, %d of them handshake refusals (of %d); want %d and %d: %q", len(lines), refused, over, refusalBurst, refusalBurst-1, lines)
	}
}
