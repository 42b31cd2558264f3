package leader

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
)

func opts(id string) Options {
	return Options{Namespace: "csi-agent", Lease: "csi-agent-controller", Identity: id,
		LeaseDuration: time.Second, RenewDeadline: 500 * time.Millisecond, RetryPeriod: 50 * time.Millisecond}
}

func holder(t *testing.T, c kubernetes.Interface) string {
	t.Helper()
	l, err := c.CoordinationV1().Leases("csi-agent").Get(context.Background(), "csi-agent-controller", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

func TestTasksStopBeforeTheLeaseIsReleased(t *testing.T) {
	c := fake.NewClientset()
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	var holderAtStop atomic.Value
	var leading atomic.Bool
	done := make(chan error, 1)
	o := opts("a")
	o.OnLeader = leading.Store
	go func() {
		done <- Run(ctx, c, o, func(ctx context.Context) error {
			close(started)
			<-ctx.Done()
			holderAtStop.Store(holder(t, c))
			return ctx.Err()
		})
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("never led")
	}
	if !leading.Load() {
		t.Fatal("OnLeader(true) not called")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v after cancel, want nil", err)
	}
	if got := holderAtStop.Load(); got != "a" {
		t.Fatalf("lease held by %q while the task stopped, want a: released too early", got)
	}
	if got := holder(t, c); got != "" {
		t.Fatalf("lease held by %q after Run returned, want released", got)
	}
	if leading.Load() {
		t.Fatal("OnLeader(false) not called")
	}
}

func TestTaskErrorEndsRun(t *testing.T) {
	c := fake.NewClientset()
	boom := errors.New("boom")
	var otherStopped atomic.Bool
	err := Run(context.Background(), c, opts("a"),
		func(context.Context) error { return boom },
		func(ctx context.Context) error { <-ctx.Done(); otherStopped.Store(true); return nil })
	if !errors.Is(err, boom) {
		t.Fatalf("Run = %v, want the task's error", err)
	}
	if !otherStopped.Load() {
		t.Fatal("the other task was left running")
	}
	if got := holder(t, c); got != "" {
		t.Fatalf("lease held by %q after a failed term, want released", got)
	}
}

func TestOneLeaderAtATime(t *testing.T) {
	c := fake.NewClientset()
	var running, max atomic.Int32
	leadBy := make(chan string, 4)
	task := func(id string) Task {
		return func(ctx context.Context) error {
			n := running.Add(1)
			if n > max.Load() {
				max.Store(n)
			}
			leadBy <- id
			<-ctx.Done()
			running.Add(-1)
			return nil
		}
	}
	ctxA, stopA := context.WithCancel(context.Background())
	ctxB, stopB := context.WithCancel(context.Background())
	defer stopB()
	doneA, doneB := make(chan error, 1), make(chan error, 1)
	go func() { doneA <- Run(ctxA, c, opts("a"), task("a")) }()
	first := <-leadBy
	go func() { doneB <- Run(ctxB, c, opts("b"), task("b")) }()
	time.Sleep(300 * time.Millisecond)
	if first != "a" || running.Load() != 1 {
		t.Fatalf("first leader %s, %d running", first, running.Load())
	}
	// a stops: b takes over from the released lease, well before it expires.
	stopA()
	<-doneA
	select {
	case id := <-leadBy:
		if id != "b" {
			t.Fatalf("next leader %s", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("b never took over")
	}
	if max.Load() != 1 {
		t.Fatalf("%d leaders at once", max.Load())
	}
	stopB()
	<-doneB
}
