package workloadapi

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestRefusalReason(t *testing.T) {
	for _, tc := range []struct {
		err      error
		want     string
		wantCode codes.Code
	}{
		{refuse(reasonNoRule, codes.PermissionDenied, "no rule"), reasonNoRule, codes.PermissionDenied},
		{fmt.Errorf("stream: %w", refuse(reasonNotReady, codes.Unavailable, "starting")), reasonNotReady, codes.Unavailable},
		{status.Error(codes.InvalidArgument, "audience must be specified"), reasonInvalidRequest, codes.InvalidArgument},
		{status.Error(codes.Unavailable, "could not mint"), "", codes.Unavailable},
		{nil, "", codes.OK},
	} {
		if got := refusalReason(tc.err); got != tc.want {
			t.Errorf("refusalReason(%v) = %q, want %q", tc.err, got, tc.want)
		}
		// The client sees the code, whatever carries it.
		if got := status.Code(tc.err); got != tc.wantCode {
			t.Errorf("status.Code(%v) = %v, want %v", tc.err, got, tc.wantCode)
		}
	}
}

func TestRefusalLogLimitsEachCaller(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newRefusalLog(func() time.Time { return now })
	logged := func(key string, n int) (int, []refusalSummary) {
		var ok int
		var sums []refusalSummary
		for range n {
			o, s := l.allow(key)
			if o {
				ok++
			}
			sums = append(sums, s...)
		}
		return ok, sums
	}
	if n, _ := logged("uid:1", 100); n != refusalBurst {
		t.Fatalf("a storm of 100: %d lines, want %d", n, refusalBurst)
	}
	// Another caller has its own budget.
	if n, _ := logged("uid:2", 3); n != 3 {
		t.Fatalf("a quiet caller: %d of 3 logged", n)
	}
	// Within the window, still limited.
	now = now.Add(refusalWindow / 2)
	if n, _ := logged("uid:1", 1); n != 0 {
		t.Fatal("logged past the burst within the window")
	}
	// The next window: a summary of what was dropped, then a fresh budget.
	now = now.Add(refusalWindow)
	n, sums := logged("uid:1", 1)
	if n != 1 {
		t.Fatal("the next window logged nothing")
	}
	want := refusalSummary{"uid:1", 100 - refusalBurst + 1}
	if len(sums) != 1 || sums[0] != want {
		t.Fatalf("summaries %v, want [%v]", sums, want)
	}
}

func TestRefusalLogIsBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newRefusalLog(func() time.Time { return now })
	var ok int
	for i := range maxRefusalCallers + 1000 {
		if o, _ := l.allow(fmt.Sprint("uid:", i)); o {
			ok++
		}
	}
	if got := len(l.callers); got > maxRefusalCallers+1 {
		t.Fatalf("%d callers tracked, bound %d", got, maxRefusalCallers+1)
	}
	// The callers past the bound share one budget.
	if want := maxRefusalCallers + refusalBurst; ok != want {
		t.Fatalf("%d lines, want %d", ok, want)
	}
	// A window later everything tracked is swept.
	now = now.Add(refusalWindow)
	l.allow("uid:new")
	if got := len(l.callers); got != 1 {
		t.Fatalf("%d callers tracked after a quiet window, want 1", got)
	}
}
