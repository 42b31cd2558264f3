package workloadapi

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/attestor/field"
	unixattestor "github.com/csi-agent/csi-agent/attestor/unix"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// holderAttestor attests with procfs, then gives the caller the
// supplementary group named in its "test-holder" metadata, so that streams
// of one process hold different identities; it counts attestations per
// holder.
type holderAttestor struct {
	unix   Attestor
	mu     sync.Mutex
	counts map[string]int
}

func (h *holderAttestor) Attest(ctx context.Context, pid int32) (attestor.Attributes, error) {
	attrs, err := h.unix.Attest(ctx, pid)
	if err != nil {
		return nil, err
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("test-holder"); len(v) == 1 {
		attrs.Set(field.UnixSupplementaryGID, v[0])
		h.mu.Lock()
		h.counts[v[0]]++
		h.mu.Unlock()
	}
	return attrs, nil
}

func (h *holderAttestor) count(holder string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[holder]
}

// holderAgent is a Workload API server as NewGRPCServer makes it, with the
// holderAttestor and a cache on a fake clock that nothing renews unless the
// test asks.
type holderAgent struct {
	srv    *Server
	cache  *svidcache.Cache
	att    *holderAttestor
	clock  *clocktesting.FakeClock
	socket string
}

func startHolderAgent(t *testing.T, svids []rules.SVID) *holderAgent {
	t.Helper()
	return startHolderAgentWith(t, svids, nil, Limits{})
}

// startHolderAgentWith is startHolderAgent with the server's metrics and limits.
func startHolderAgentWith(t *testing.T, svids []rules.SVID, m Metrics, limits Limits) *holderAgent {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	auth, err := ca.New(context.Background(), ca.Options{TrustDomain: td, StateDir: t.TempDir(), X509SVIDTTL: time.Hour, JWTSVIDTTL: 5 * time.Minute, IntermediateTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	fc := clocktesting.NewFakeClock(time.Now())
	cache := svidcache.New(auth, svidcache.Options{Clock: fc})
	unix, err := unixattestor.New(unixattestor.Options{ProcRoot: "/proc", PasswdFile: "/etc/passwd", GroupFile: "/etc/group"})
	if err != nil {
		t.Fatal(err)
	}
	att := &holderAttestor{unix: unix, counts: map[string]int{}}
	set, err := rules.Compile(td, svids)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{TrustDomain: td, Unix: att, Rules: set, Bundle: auth, SVIDs: cache, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	lis, err := Listen(dir, "agent.sock")
	if err != nil {
		t.Fatal(err)
	}
	g, _ := NewGRPCServer(srv, limits)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	srv.SetReady(true)
	return &holderAgent{srv: srv, cache: cache, att: att, clock: fc, socket: filepath.Join(dir, "agent.sock")}
}

// A renewal wakes, re-attests and updates only the streams holding the
// renewed SVID; a rules change re-attests every stream.
func TestRenewalReattestsOnlyItsHolders(t *testing.T) {
	gidRule := func(id, gid string) rules.SVID {
		return rules.SVID{SPIFFEID: id, Rules: []rules.Rule{{Match: map[string]string{field.UnixSupplementaryGID: gid}}}}
	}
	svids := []rules.SVID{gidRule("/a", "70001"), gidRule("/b", "70002")}
	a := startHolderAgent(t, svids)
	srv, cache, att, fc := a.srv, a.cache, a.att, a.clock
	td := spiffeid.RequireTrustDomainFromString("example.org")
	set, err := rules.Compile(td, svids)
	if err != nil {
		t.Fatal(err)
	}
	idA, idB := spiffeid.RequireFromPath(td, "/a"), spiffeid.RequireFromPath(td, "/b")
	// Minted up front, /b twenty minutes after /a: a stream's own first
	// mint would wake it once more.
	for i, id := range []spiffeid.ID{idA, idB} {
		fc.Step(time.Duration(i) * 20 * time.Minute)
		if _, _, err := cache.X509SVID(context.Background(), id, nil); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	open := func(holder string) workloadpb.SpiffeWorkloadAPI_FetchX509SVIDClient {
		c := rawClient(t, a.socket)
		stream, err := c.FetchX509SVID(metadata.AppendToOutgoingContext(withHeader(ctx), "test-holder", holder), &workloadpb.X509SVIDRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return stream
	}
	recvSerial := func(stream workloadpb.SpiffeWorkloadAPI_FetchX509SVIDClient, want spiffeid.ID) string {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != want.String() {
			t.Fatalf("stream got %v, want one SVID for %s", resp.Svids, want)
		}
		return string(resp.Svids[0].X509Svid)
	}
	streamA, streamB := open("70001"), open("70002")
	firstA := recvSerial(streamA, idA)
	recvSerial(streamB, idB)
	if a, b := att.count("70001"), att.count("70002"); a != 1 || b != 1 {
		t.Fatalf("attestations after opening: a %d, b %d; want 1 each", a, b)
	}

	// /a past half life, /b not.
	fc.Step(11 * time.Minute)
	if _, minted, err := cache.X509SVID(context.Background(), idA, nil); err != nil || !minted {
		t.Fatalf("renewing /a: minted %v, %v", minted, err)
	}
	if recvSerial(streamA, idA) == firstA {
		t.Fatal("stream a was sent the SVID it had")
	}
	time.Sleep(100 * time.Millisecond) // room for a wrong wake-up to show
	if a, b := att.count("70001"), att.count("70002"); a != 2 || b != 1 {
		t.Fatalf("attestations after renewing /a: a %d, b %d; want 2 and 1 (only a's holder re-attests)", a, b)
	}

	// A rules change concerns every stream: each re-attests.
	srv.SetRules(set)
	deadline := time.Now().Add(5 * time.Second)
	for att.count("70001") != 3 || att.count("70002") != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("attestations after a rules change: a %d, b %d; want 3 and 2", att.count("70001"), att.count("70002"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// And the cache's broadcast (authority change) as well.
	cache.Notify()
	for att.count("70001") != 4 || att.count("70002") != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("attestations after Notify: a %d, b %d; want 4 and 3", att.count("70001"), att.count("70002"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
