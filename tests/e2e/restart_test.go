package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// The restart cases run last: they disturb the node for everything else.

// runningWorkload starts a watching workload and returns it with its first SVID.
func runningWorkload(ctx context.Context, t *testing.T, name string) (*corev1.Pod, event) {
	t.Helper()
	ns := "e2e-restart"
	ensureNamespace(ctx, t, ns)
	p := createPod(ctx, t, workloadPod(ns, name, "default"))
	e, _ := firstSVID(ctx, t, p)
	if want := nsSAID(ns, "default"); !sameIDs(e.IDs, want) || !e.Verified {
		t.Fatalf("SVIDs %v verified=%v, want [%s]", e.IDs, e.Verified, want)
	}
	return waitRunning(ctx, t, p), e
}

// rotatedAfter waits for an SVID update with a new serial issued after t0.
func rotatedAfter(ctx context.Context, t *testing.T, p *corev1.Pod, t0 time.Time, old []string) event {
	t.Helper()
	e, _ := waitEvent(ctx, t, p, 90*time.Second, "rotated SVID after "+t0.Format("15:04:05.000"), func(e event) bool {
		return e.Event == "x509" && e.Time.After(t0) && len(e.Serials) > 0 && !slices.Contains(old, e.Serials[0])
	})
	if !e.Verified || !sameIDs(e.IDs, nsSAID(p.Namespace, "default")) {
		t.Fatalf("rotated SVID %v verified=%v (%s)", e.IDs, e.Verified, e.Error)
	}
	return e
}

func serialsBefore(ctx context.Context, t *testing.T, p *corev1.Pod) []string {
	t.Helper()
	evs, err := podEvents(ctx, p, p.Spec.Containers[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, e := range evs {
		s = append(s, e.Serials...)
	}
	return s
}

func sameContainer(ctx context.Context, t *testing.T, before *corev1.Pod) {
	t.Helper()
	now := getPod(ctx, t, before)
	b, a := before.Status.ContainerStatuses[0], now.Status.ContainerStatuses[0]
	if a.ContainerID != b.ContainerID || a.RestartCount != 0 {
		t.Errorf("workload container was restarted: %s -> %s, restarts %d", b.ContainerID, a.ContainerID, a.RestartCount)
	}
}

// Case 6a: restarting the kubelet keeps running pods working and stacks no
// second mount on their volume (the kubelet re-publishes after a restart).
func TestKubeletRestartKeepsPodsWithoutStackedMounts(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	p, _ := runningWorkload(ctx, t, "kubelet-restart")
	target := csiTarget(p, "spiffe-workload-api")
	if ms := mountsAt(ctx, t, target); len(ms) != 1 {
		t.Fatalf("before restart: %d mounts at %s", len(ms), target)
	}
	old := serialsBefore(ctx, t, p)

	t0 := time.Now()
	if err := suite.node.RestartKubelet(ctx); err != nil {
		t.Fatalf("restart kubelet: %v", err)
	}
	t.Logf("kubelet restarted in %.1fs", time.Since(t0).Seconds())
	// Watch the mount table while the restarted kubelet reconstructs and
	// re-syncs the pod's volumes, and until the workload has rotated again.
	done := make(chan struct{})
	stacked := make(chan int, 1)
	go func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(200 * time.Millisecond):
			}
			if n := len(mountsAt(ctx, t, target)); n > 1 {
				select {
				case stacked <- n:
				default:
				}
			}
		}
	}()
	rotatedAfter(ctx, t, p, t0, old)
	// A new pod after the restart is served too.
	q := createPod(ctx, t, workloadPod(p.Namespace, "after-kubelet-restart", "default"))
	firstSVID(ctx, t, q)
	close(done)
	select {
	case n := <-stacked:
		t.Errorf("%d mounts stacked at %s after the kubelet restart", n, target)
	default:
	}
	if ms := mountsAt(ctx, t, target); len(ms) != 1 {
		t.Errorf("after restart: %d mounts at %s, want 1", len(ms), target)
	}
	sameContainer(ctx, t, p)
}

// Case 6b: SIGKILL of the agent: its records survive, and running pods get
// their rotated SVIDs through the re-created socket without a restart.
func TestAgentSIGKILLKeepsRecordsAndServesRunningPods(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	p, _ := runningWorkload(ctx, t, "agent-kill")
	recsBefore, err := suite.node.Records(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(recordsOf(ctx, t, string(p.UID))) != 1 {
		t.Fatalf("no record for the workload before the kill")
	}
	old := serialsBefore(ctx, t, p)
	agent := agentPod(ctx, t)
	if len(agent.Status.ContainerStatuses) == 0 {
		t.Fatalf("agent pod has no container status: %s", framework.PodSummary(agent))
	}
	before := agent.Status.ContainerStatuses[0]

	t0 := time.Now()
	if err := suite.node.KillContainer(ctx, before.ContainerID); err != nil {
		t.Fatal(err)
	}
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		cur := agentPod(ctx, t)
		return len(cur.Status.ContainerStatuses) > 0 && cur.Status.ContainerStatuses[0].RestartCount > before.RestartCount && framework.PodReady(cur), nil
	})
	if err != nil {
		t.Fatalf("agent did not come back: %s", framework.PodSummary(agentPod(ctx, t)))
	}
	t.Logf("agent back and ready %.1fs after SIGKILL", time.Since(t0).Seconds())

	recsAfter, err := suite.node.Records(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(recsAfter) != len(recsBefore) {
		t.Errorf("records: %d before the kill, %d after", len(recsBefore), len(recsAfter))
	}
	for _, r := range recsBefore {
		if !slices.ContainsFunc(recsAfter, func(a records.Record) bool {
			return a.TargetPath == r.TargetPath && a.PodUID == r.PodUID && a.ServiceAccount == r.ServiceAccount
		}) {
			t.Errorf("record for %s lost in the kill", r.TargetPath)
		}
	}
	e := rotatedAfter(ctx, t, p, t0, old)
	t.Logf("workload received a new SVID %.1fs after the kill", e.Time.Sub(t0).Seconds())
	// The new SVID came over a new connection: the old stream broke first.
	evs, err := podEvents(ctx, p, p.Spec.Containers[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(evs, func(x event) bool { return x.Event == "error" && x.Time.After(t0) && x.Time.Before(e.Time) }) {
		t.Errorf("the workload's stream did not break when the agent was killed:%s", describeEvents(evs))
	}
	sameContainer(ctx, t, p)
	if ms := mountsAt(ctx, t, csiTarget(p, "spiffe-workload-api")); len(ms) != 1 {
		t.Errorf("after the agent restart: %d mounts at the target, want 1", len(ms))
	}
}
