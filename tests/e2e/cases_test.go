package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Case 1: a pod with the CSI volume gets spiffe://<td>/ns/<ns>/sa/<sa>
// through go-spiffe, and the chain verifies against the bundle it received.
// The agent's publish is recorded and mounted once, read-only.
func TestPodGetsIdentityFromCSIVolume(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns, sa := "e2e-basic", "web-sa"
	ensureNamespace(ctx, t, ns, sa)
	p := createPod(ctx, t, workloadPod(ns, "basic", sa))

	e, _ := firstSVID(ctx, t, p)
	if want := nsSAID(ns, sa); !sameIDs(e.IDs, want) {
		t.Fatalf("SVIDs %v, want exactly [%s]", e.IDs, want)
	}
	if !e.Verified {
		t.Fatalf("chain does not verify against the received bundle: %s", e.Error)
	}

	recs := recordsOf(ctx, t, string(p.UID))
	if len(recs) != 1 {
		t.Fatalf("records for pod %s: %+v, want 1", p.UID, recs)
	}
	r := recs[0]
	if r.PodNamespace != ns || r.PodName != p.Name || r.ServiceAccount != sa || r.TargetPath != csiTarget(p, "spiffe-workload-api") {
		t.Errorf("record %+v does not describe pod %s/%s sa=%s target=%s", r, ns, p.Name, sa, csiTarget(p, "spiffe-workload-api"))
	}
	if ms := mountsAt(ctx, t, r.TargetPath); len(ms) != 1 {
		t.Errorf("mounts at %s: %+v, want exactly one", r.TargetPath, ms)
	}
}

// The publish is read-only (and nosuid, nodev, noexec) in the node's own
// mount table, the kubelet's view, not only inside the agent's container:
// flags set by a remount in the agent's namespace do not propagate.
func TestPublishIsReadOnlyOnTheNode(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-basic"
	ensureNamespace(ctx, t, ns)
	p := createPod(ctx, t, workloadPod(ns, "node-view", "default"))
	firstSVID(ctx, t, p)
	target := csiTarget(p, "spiffe-workload-api")
	ms := mountsAt(ctx, t, target)
	if len(ms) != 1 {
		t.Fatalf("mounts at %s: %+v, want exactly one", target, ms)
	}
	opts := strings.Split(ms[0].Options, ",")
	for _, want := range []string{"ro", "nosuid", "nodev", "noexec"} {
		if !slices.Contains(opts, want) {
			t.Errorf("node's mount at %s has options %q, lacks %s", target, ms[0].Options, want)
		}
	}
}

// The example workload of deploy/kind/example, as its Deployment's pod
// template has it, gets the identity of its namespace and service account.
func TestExampleWorkloadGetsIdentity(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	objs, err := framework.Kustomize(filepath.Join(wd, "..", "..", "deploy", "kind", "example"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := framework.PodFromDeployment(objs, "spiffe-demo")
	if err != nil {
		t.Fatal(err)
	}
	p.Name = "spiffe-demo-e2e"
	p.Spec.NodeName = suite.node.Name()
	// The one change: this node's CNI is loopback-only (no pod IPs).
	p.Spec.HostNetwork = true
	ensureNamespace(ctx, t, p.Namespace, p.Spec.ServiceAccountName)
	p = createPod(ctx, t, p)
	e, _ := firstSVID(ctx, t, p)
	if want := nsSAID(p.Namespace, p.Spec.ServiceAccountName); !sameIDs(e.IDs, want) || !e.Verified {
		t.Fatalf("SVIDs %v verified=%v (%s), want [%s]", e.IDs, e.Verified, e.Error, want)
	}
}

// Case 2: a pod that mounts the socket directory through hostPath, without
// the CSI volume, is refused.
func TestHostPathSocketIsDenied(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-hostpath"
	ensureNamespace(ctx, t, ns, "intruder")
	hostPathDir := corev1.HostPathDirectory
	p := workloadPod(ns, "hostpath", "intruder", withArgs("fetch"))
	p.Spec.RestartPolicy = corev1.RestartPolicyNever
	p.Spec.Volumes[0].VolumeSource = corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: suite.node.SocketDir(), Type: &hostPathDir}}
	p = createPod(ctx, t, p)

	e, _ := waitEvent(ctx, t, p, 60*time.Second, "fetch outcome", func(e event) bool { return e.Event == "error" || e.Event == "x509" })
	if e.Event == "x509" {
		t.Fatalf("a pod without the CSI volume got SVIDs %v", e.IDs)
	}
	if e.Code != "PermissionDenied" {
		t.Fatalf("fetch through the hostPath socket failed with %s (%s), want PermissionDenied", e.Code, e.Error)
	}
}

// Case 3: a csi volume without readOnly: true is refused at publish: the pod
// does not start and its events say why.
func TestWritableVolumeIsRefused(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-writable"
	ensureNamespace(ctx, t, ns)
	p := workloadPod(ns, "writable", "default")
	p.Spec.Volumes[0].CSI.ReadOnly = nil
	p.Spec.Containers[0].VolumeMounts[0].ReadOnly = false
	p = createPod(ctx, t, p)

	var why string
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		l, err := suite.client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.uid=" + string(p.UID)})
		if err != nil {
			return false, nil
		}
		for _, e := range l.Items {
			if e.Reason == "FailedMount" && strings.Contains(strings.ToLower(e.Message), "read") {
				why = e.Message
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no FailedMount event naming the read-only requirement: %s", podK8sEvents(ctx, p))
	}
	t.Logf("pod event: %s", why)
	cur := getPod(ctx, t, p)
	for _, cs := range cur.Status.ContainerStatuses {
		if cs.State.Running != nil || cs.ContainerID != "" {
			t.Errorf("container %s started: %s", cs.Name, framework.PodSummary(cur))
		}
	}
	if cur.Status.Phase != corev1.PodPending {
		t.Errorf("pod phase %s, want Pending", cur.Status.Phase)
	}
	if recs := recordsOf(ctx, t, string(p.UID)); len(recs) != 0 {
		t.Errorf("refused volume was recorded: %+v", recs)
	}
	if ms := mountsAt(ctx, t, csiTarget(p, "spiffe-workload-api")); len(ms) != 0 {
		t.Errorf("refused volume is mounted: %+v", ms)
	}
}

// Case 4: from inside the pod, writing into the mounted directory fails.
func TestMountedDirectoryIsReadOnly(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-readonly"
	ensureNamespace(ctx, t, ns)
	p := workloadPod(ns, "readonly", "default", withArgs("watch", "--probe-write", socketMountPath))
	// Root in the container and a volumeMount without readOnly: only the
	// volume's read-only publish can stop the write.
	p.Spec.Containers[0].VolumeMounts[0].ReadOnly = false
	root, no := int64(0), false
	p.Spec.Containers[0].SecurityContext.RunAsUser = &root
	p.Spec.Containers[0].SecurityContext.RunAsNonRoot = &no
	p = createPod(ctx, t, p)

	e, _ := waitEvent(ctx, t, p, 60*time.Second, "write probe", func(e event) bool { return e.Event == "write" })
	if e.Error == "" {
		t.Fatalf("root in the pod wrote into %s", socketMountPath)
	}
	if e.Errno != "EROFS" {
		t.Errorf("write failed with %q (%s), want EROFS", e.Errno, e.Error)
	}
	if _, err := os.Stat(suite.node.SocketDir() + "/written-by-workload"); err == nil && os.Getenv(kindNodeEnv) == "" {
		t.Errorf("the write reached the host socket directory")
	}
}

// Case 5: deleting the pod unpublishes: its mount and its record are gone.
func TestDeletingPodUnpublishes(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-unpublish"
	ensureNamespace(ctx, t, ns)
	p := createPod(ctx, t, workloadPod(ns, "unpublish", "default"))
	firstSVID(ctx, t, p)
	target := csiTarget(p, "spiffe-workload-api")
	if len(recordsOf(ctx, t, string(p.UID))) != 1 || len(mountsAt(ctx, t, target)) != 1 {
		t.Fatalf("before delete: want one record and one mount at %s", target)
	}

	dctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := deletePod(dctx, p); err != nil {
		t.Fatalf("pod not deleted: %v", err)
	}
	// The kubelet removes the pod from the API only after tearing its
	// volumes down; allow the agent's record removal a moment all the same.
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 20*time.Second, true, func(ctx context.Context) (bool, error) {
		return len(recordsOf(ctx, t, string(p.UID))) == 0 && len(podMounts(ctx, t, string(p.UID))) == 0, nil
	})
	if err != nil {
		t.Fatalf("after delete: records %+v, mounts %+v", recordsOf(ctx, t, string(p.UID)), podMounts(ctx, t, string(p.UID)))
	}
}

// Case 7: a rule on a pod label and one on a container name select the right
// pod and not its neighbour.
func TestRulesSelectByLabelAndContainer(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ensureNamespace(ctx, t, rulesNamespace)
	web := createPod(ctx, t, workloadPod(rulesNamespace, "web", "default", withLabels(map[string]string{"app": "web"})))
	worker := createPod(ctx, t, workloadPod(rulesNamespace, "worker", "default", withLabels(map[string]string{"app": "batch"}), withContainerName("worker")))

	for _, c := range []struct {
		pod  *corev1.Pod
		want string
	}{
		{web, spiffeID("/e2e/pod-label/web")},
		{worker, spiffeID("/e2e/container-name/worker")},
	} {
		_, evs := waitEvent(ctx, t, c.pod, 90*time.Second, c.want, func(e event) bool { return e.Event == "x509" && len(e.IDs) > 0 && e.IDs[0] == c.want })
		for _, e := range evs {
			if e.Event == "x509" && !sameIDs(e.IDs, c.want) {
				t.Errorf("%s got %v, want exactly [%s]", c.pod.Name, e.IDs, c.want)
			}
		}
	}
}

// Case 8: a pod whose postStart hook runs long gets its pod-level identity
// before the hook ends (the kubelet lists the container's ID only after).
func TestIdentityDuringSlowPostStart(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns := "e2e-poststart"
	hook := 30 * time.Second
	ensureNamespace(ctx, t, ns)
	p := workloadPod(ns, "poststart", "default")
	p.Spec.Containers[0].Lifecycle = &corev1.Lifecycle{PostStart: &corev1.LifecycleHandler{
		Exec: &corev1.ExecAction{Command: []string{"/workload", "sleep", hook.String()}},
	}}
	p = createPod(ctx, t, p)

	e, evs := waitEvent(ctx, t, p, hook+60*time.Second, "X.509-SVID", func(e event) bool { return e.Event == "x509" })
	if want := nsSAID(ns, "default"); !sameIDs(e.IDs, want) {
		t.Fatalf("SVIDs %v, want exactly [%s]", e.IDs, want)
	}
	start := evs[0]
	if start.Event != "start" {
		t.Fatalf("first event %q, want start", start.Event)
	}
	// The hook starts after the process; it cannot have ended before start+hook.
	if got := e.Time.Sub(start.Time); got >= hook {
		t.Fatalf("first SVID %.1fs after the container started, not before the %s hook ended", got.Seconds(), hook)
	} else {
		t.Logf("first SVID %.2fs after the container started, during the %s postStart hook", got.Seconds(), hook)
	}
}

// Case 9: pods in different namespaces with different service accounts get
// different IDs, each its own.
func TestNamespacesAndServiceAccountsDiffer(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ensureNamespace(ctx, t, "e2e-ns-a", "alpha")
	ensureNamespace(ctx, t, "e2e-ns-b", "beta")
	a := createPod(ctx, t, workloadPod("e2e-ns-a", "a", "alpha"))
	b := createPod(ctx, t, workloadPod("e2e-ns-b", "b", "beta"))
	ea, _ := firstSVID(ctx, t, a)
	eb, _ := firstSVID(ctx, t, b)
	if want := nsSAID("e2e-ns-a", "alpha"); !sameIDs(ea.IDs, want) || !ea.Verified {
		t.Errorf("pod a: %v verified=%v, want [%s]", ea.IDs, ea.Verified, want)
	}
	if want := nsSAID("e2e-ns-b", "beta"); !sameIDs(eb.IDs, want) || !eb.Verified {
		t.Errorf("pod b: %v verified=%v, want [%s]", eb.IDs, eb.Verified, want)
	}
}

// Measurement, not an assertion: time from the create call to the pod's
// first SVID, one pod after another, split at the workload's own start.
// Reported in BENCHMARKS.md.
func TestFirstSVIDLatency(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	ns, n := "e2e-latency", 12
	ensureNamespace(ctx, t, ns)
	var total, toStart, toSVID []time.Duration
	retried := 0
	for i := range n {
		created := time.Now()
		p := createPod(ctx, t, workloadPod(ns, fmt.Sprintf("latency-%d", i), "default"))
		e, evs := firstSVID(ctx, t, p)
		total = append(total, e.Time.Sub(created))
		if evs[0].Event == "start" {
			toStart = append(toStart, evs[0].Time.Sub(created))
			toSVID = append(toSVID, e.Time.Sub(evs[0].Time))
		}
		for _, x := range evs {
			if x.Event == "error" {
				retried++
				t.Logf("%s: error before the first SVID: %s %s", p.Name, x.Code, x.Error)
				break
			}
		}
		dctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		if err := deletePod(dctx, p); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	line := fmt.Sprintf("pod create -> first X.509-SVID over %d pods: %s; create -> workload start: %s; workload start -> first SVID: %s; pods that saw an error first: %d",
		n, quantiles(total), quantiles(toStart), quantiles(toSVID), retried)
	t.Log(line)
	if out := os.Getenv("CSI_AGENT_E2E_RESULTS"); out != "" {
		f, err := os.OpenFile(out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintf(f, "%s %s\n", time.Now().UTC().Format(time.RFC3339), line)
			f.Close()
		}
	}
}

func quantiles(d []time.Duration) string {
	if len(d) == 0 {
		return "n/a"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(f float64) time.Duration { return s[int(f*float64(len(s)-1)+0.5)].Round(time.Millisecond) }
	return fmt.Sprintf("p50 %s, p90 %s, min %s, max %s", q(0.5), q(0.9), s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}
