package workloadapi

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/peer"
)

// CallerLimits bound what one caller (peer.Info.Caller) can make the agent
// do, over every service on the socket, health included.
type CallerLimits struct {
	// Streams bounds one caller's open streams, TotalStreams all callers';
	// zero: no bound.
	Streams      int
	TotalStreams int
	// DeniedPerSecond and DeniedBurst bound one caller's denied calls: past
	// the burst, its calls are refused at once, before any attestation
	// work, until the bucket refills. Zero DeniedPerSecond: no bound.
	DeniedPerSecond float64
	DeniedBurst     int
}

// guard enforces CallerLimits as gRPC interceptors.
type guard struct {
	limits CallerLimits
	clock  func() time.Time

	mu      sync.Mutex
	callers map[string]*callerState
	adds    int
	streams int // open in all

	refused atomic.Uint64 // calls refused by the limits

	// Every refusal, the guard's and the handlers', is counted and logged here.
	metrics  Metrics
	refusals *refusalLog
}

type callerState struct {
	streams int
	denied  *rate.Limiter
}

// sweepEvery bounds the callers map: every so many new callers, those with
// nothing open and a full bucket are forgotten.
const sweepEvery = 1024

func newGuard(l CallerLimits) *guard {
	return &guard{limits: l, clock: time.Now, callers: map[string]*callerState{},
		metrics: noMetrics{}, refusals: newRefusalLog(time.Now)}
}

func (g *guard) state(key string) *callerState {
	st := g.callers[key]
	if st == nil {
		if g.adds++; g.adds%sweepEvery == 0 {
			g.sweep()
		}
		st = &callerState{}
		if g.limits.DeniedPerSecond > 0 {
			st.denied = rate.NewLimiter(rate.Limit(g.limits.DeniedPerSecond), max(g.limits.DeniedBurst, 1))
		}
		g.callers[key] = st
	}
	return st
}

func (g *guard) sweep() {
	now := g.clock()
	for k, st := range g.callers {
		if st.streams == 0 && (st.denied == nil || st.denied.TokensAt(now) >= float64(st.denied.Burst())) {
			delete(g.callers, k)
		}
	}
}

// admit refuses a caller out of denied-call budget; stream also reserves
// one of its streams, released by the returned func.
func (g *guard) admit(ctx context.Context, stream bool) (key string, release func(), err error) {
	info, ok := peer.FromContext(ctx)
	if !ok {
		return "", func() {}, nil // not on our socket (tests); the RPC refuses it
	}
	key = info.Caller()
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.state(key)
	if st.denied != nil && st.denied.TokensAt(g.clock()) < 1 {
		g.refused.Add(1)
		return key, nil, refuse(reasonDeniedBudget, codes.ResourceExhausted, "too many denied calls from this caller; retry later")
	}
	if !stream {
		return key, func() {}, nil
	}
	if g.limits.Streams > 0 && st.streams >= g.limits.Streams {
		g.refused.Add(1)
		return key, nil, refuse(reasonCallerStreams, codes.ResourceExhausted, "this caller already holds %d open streams, the limit", st.streams)
	}
	if g.limits.TotalStreams > 0 && g.streams >= g.limits.TotalStreams {
		g.refused.Add(1)
		return key, nil, refuse(reasonTotalStreams, codes.ResourceExhausted, "the agent holds %d open streams, the limit", g.streams)
	}
	st.streams++
	g.streams++
	g.metrics.StreamsOpen(1)
	return key, func() {
		g.mu.Lock()
		st.streams--
		g.streams--
		g.mu.Unlock()
		g.metrics.StreamsOpen(-1)
	}, nil
}

// settle charges a denied call to its caller's budget.
func (g *guard) settle(key string, err error) {
	if key == "" || g.limits.DeniedPerSecond <= 0 {
		return
	}
	switch status.Code(err) {
	case codes.PermissionDenied, codes.InvalidArgument, codes.Unauthenticated:
	default:
		return
	}
	g.mu.Lock()
	st := g.state(key)
	st.denied.AllowN(g.clock(), 1)
	out := st.denied.TokensAt(g.clock()) < 1
	g.mu.Unlock()
	if out {
		klog.V(1).InfoS("Caller out of denied-call budget; its calls are refused for a while", "caller", key)
	}
}

// report counts and logs err if it refused the call.
func (g *guard) report(ctx context.Context, err error) {
	reason := refusalReason(err)
	if reason == "" {
		return
	}
	g.metrics.Denied(reason)
	var who *peer.Info
	if info, ok := peer.FromContext(ctx); ok {
		who = &info
	}
	g.refusals.log(refusedCall, who, reason, err)
}

// connectionRefused counts and logs a connection refused at the handshake
// (peer.Limits.Refused), then tells next, if set.
func (g *guard) connectionRefused(next func(string, peer.Info, error)) func(string, peer.Info, error) {
	return func(reason string, info peer.Info, err error) {
		g.metrics.Denied(reason)
		g.refusals.log(refusedConnection, &info, reason, err)
		if next != nil {
			next(reason, info, err)
		}
	}
}

func (g *guard) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	key, _, err := g.admit(ctx, false)
	if err != nil {
		g.report(ctx, err)
		return nil, err
	}
	resp, err := handler(ctx, req)
	g.settle(key, err)
	g.report(ctx, err)
	return resp, err
}

func (g *guard) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	key, release, err := g.admit(ss.Context(), true)
	if err != nil {
		g.report(ss.Context(), err)
		return err
	}
	defer release()
	err = handler(srv, ss)
	g.settle(key, err)
	g.report(ss.Context(), err)
	return err
}
