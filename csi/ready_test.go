package csi

import (
	"context"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// While the Workload API socket is not served, a publish would hand the pod
// an empty directory: it is refused with Unavailable, which the kubelet
// retries, and leaves nothing behind.
func TestPublishWaitsForTheSocket(t *testing.T) {
	e := newFakeEnv(t)
	var ready atomic.Bool
	e.d.ready = ready.Load
	target := e.target(t, testPodUID, "spiffe")
	_, err := e.node.NodePublishVolume(context.Background(), publishReq(testPodUID, target))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("publish without a socket: %v, want Unavailable", err)
	}
	if ms := e.mountsAt(t, target); len(ms) != 0 {
		t.Fatalf("mounted without a socket: %v", ms)
	}
	if recs := e.store.ByPodUID(testPodUID); len(recs) != 0 {
		t.Fatalf("recorded without a socket: %v", recs)
	}
	ready.Store(true)
	publish(t, e, publishReq(testPodUID, target))
	if ms := e.mountsAt(t, target); len(ms) != 1 {
		t.Fatalf("%d mounts after the socket came back, want 1", len(ms))
	}
}
