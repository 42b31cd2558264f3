package workloadapi

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/peer"
)

func callerCtx(uid uint32) context.Context {
	return grpcpeer.NewContext(context.Background(), &grpcpeer.Peer{AuthInfo: peer.AuthInfo{Info: peer.Info{UID: uid}}})
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }

func TestGuardDeniedBudget(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	g := newGuard(CallerLimits{DeniedPerSecond: 1, DeniedBurst: 3})
	g.clock = func() time.Time { return now }
	calls := 0
	deny := func(context.Context, any) (any, error) {
		calls++
		return nil, status.Error(codes.PermissionDenied, "no")
	}
	allow := func(context.Context, any) (any, error) { calls++; return "ok", nil }
	call := func(uid uint32, h grpc.UnaryHandler) codes.Code {
		_, err := g.unary(callerCtx(uid), nil, &grpc.UnaryServerInfo{}, h)
		return status.Code(err)
	}
	for i := range 3 {
		if c := call(1000, deny); c != codes.PermissionDenied {
			t.Fatalf("denied call %d: %v", i, c)
		}
	}
	calls = 0
	if c := call(1000, deny); c != codes.ResourceExhausted || calls != 0 {
		t.Fatalf("past the burst: %v with %d handler calls, want ResourceExhausted without running the handler", c, calls)
	}
	if c := call(1000, allow); c != codes.ResourceExhausted {
		t.Fatalf("an out-of-budget caller's next call: %v", c)
	}
	if c := call(2000, deny); c != codes.PermissionDenied {
		t.Fatalf("another caller is not limited: %v", c)
	}
	now = now.Add(time.Second)
	if c := call(1000, allow); c != codes.OK {
		t.Fatalf("after the bucket refilled one token: %v", c)
	}
	// Calls that succeed do not spend the budget.
	for range 10 {
		if c := call(1000, allow); c != codes.OK {
			t.Fatalf("allowed call: %v", c)
		}
	}
	if n := g.refused.Load(); n != 2 {
		t.Fatalf("%d refusals counted, want 2", n)
	}
}

func TestGuardStreamsPerCaller(t *testing.T) {
	g := newGuard(CallerLimits{Streams: 2, TotalStreams: 3})
	hold := make(chan struct{})
	started := make(chan struct{}, 4)
	handler := func(any, grpc.ServerStream) error { started <- struct{}{}; <-hold; return nil }
	errs := make(chan error, 4)
	for range 2 {
		go func() { errs <- g.stream(nil, fakeStream{ctx: callerCtx(1000)}, &grpc.StreamServerInfo{}, handler) }()
		<-started
	}
	if err := g.stream(nil, fakeStream{ctx: callerCtx(1000)}, &grpc.StreamServerInfo{}, handler); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third stream: %v, want ResourceExhausted", err)
	}
	go func() { errs <- g.stream(nil, fakeStream{ctx: callerCtx(2000)}, &grpc.StreamServerInfo{}, handler) }()
	<-started // another caller's stream opens
	if err := g.stream(nil, fakeStream{ctx: callerCtx(3000)}, &grpc.StreamServerInfo{}, handler); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a fourth stream in all: %v, want ResourceExhausted", err)
	}
	close(hold)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if err := g.stream(nil, fakeStream{ctx: callerCtx(1000)}, &grpc.StreamServerInfo{}, func(any, grpc.ServerStream) error { return nil }); err != nil {
		t.Fatalf("after the streams closed: %v", err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for k, st := range g.callers {
		if st.streams != 0 {
			t.Errorf("%s still counts %d streams", k, st.streams)
		}
	}
}

func TestCheckAudience(t *testing.T) {
	s := &Server{maxAudiences: 3, maxAudienceBytes: 8}
	for _, tc := range []struct {
		name string
		aud  []string
		want string
	}{
		{"fits", []string{"a", "12345678"}, ""},
		{"too many values", []string{"a", "b", "c", "d"}, "at most 3"},
		{"value too large", []string{"123456789"}, "at most 8"},
		{"empty value", []string{"a", ""}, "empty value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := s.checkAudience(tc.aud)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("checkAudience: %v", err)
			case tc.want != "" && (status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("checkAudience = %v, want InvalidArgument naming %q", err, tc.want)
			}
		})
	}
}
