package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

const (
	socketMountPath = "/spiffe-workload-api"
	endpointSocket  = "unix:///spiffe-workload-api/agent.sock"
	workloadUID     = 65532
)

// event is one line the workload prints (tests/e2e/workload).
type event struct {
	Event    string    `json:"event"`
	Time     time.Time `json:"time"`
	Seq      int       `json:"seq"`
	IDs      []string  `json:"ids"`
	Serials  []string  `json:"serials"`
	NotAfter []string  `json:"notAfter"`
	Verified bool      `json:"verified"`
	Code     string    `json:"code"`
	Error    string    `json:"error"`
	Errno    string    `json:"errno"`
}

func spiffeID(path string) string { return "spiffe://" + suite.trustDomain + path }

func nsSAID(ns, sa string) string { return spiffeID("/ns/" + ns + "/sa/" + sa) }

// ensureNamespace creates a namespace and service accounts in it (this node
// has no controller that would make the default one).
func ensureNamespace(ctx context.Context, t *testing.T, ns string, sas ...string) {
	t.Helper()
	_, err := suite.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	for _, sa := range append([]string{"default"}, sas...) {
		_, err := suite.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
}

type podOpt func(*corev1.Pod)

func withLabels(l map[string]string) podOpt { return func(p *corev1.Pod) { p.Labels = l } }
func withContainerName(n string) podOpt {
	return func(p *corev1.Pod) { p.Spec.Containers[0].Name = n }
}
func withArgs(a ...string) podOpt { return func(p *corev1.Pod) { p.Spec.Containers[0].Args = a } }

// workloadPod is a pod of the test workload with the CSI volume at
// /spiffe-workload-api, as the example Deployment has it.
func workloadPod(ns, name, sa string, opts ...podOpt) *corev1.Pod {
	no, yes := false, true
	uid := int64(workloadUID)
	grace := int64(1)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			NodeName:                      suite.node.Name(),
			ServiceAccountName:            sa,
			AutomountServiceAccountToken:  &no,
			HostNetwork:                   true,
			TerminationGracePeriodSeconds: &grace,
			RestartPolicy:                 corev1.RestartPolicyAlways,
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			Containers: []corev1.Container{{
				Name:            "app",
				Image:           framework.WorkloadImage,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Args:            []string{"watch"},
				Env:             []corev1.EnvVar{{Name: "SPIFFE_ENDPOINT_SOCKET", Value: endpointSocket}},
				SecurityContext: &corev1.SecurityContext{RunAsUser: &uid, RunAsNonRoot: &yes, AllowPrivilegeEscalation: &no},
				VolumeMounts:    []corev1.VolumeMount{{Name: "spiffe-workload-api", MountPath: socketMountPath, ReadOnly: true}},
			}},
			Volumes: []corev1.Volume{{
				Name:         "spiffe-workload-api",
				VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: framework.DriverName, ReadOnly: &yes}},
			}},
		},
	}
	for _, o := range opts {
		o(p)
	}
	return p
}

// createPod creates the pod and deletes it (waiting until it is gone) when
// the test ends.
func createPod(ctx context.Context, t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	created, err := suite.client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := deletePod(ctx, created); err != nil {
			t.Errorf("deleting pod %s/%s: %v", created.Namespace, created.Name, err)
		}
	})
	return created
}

func deletePod(ctx context.Context, p *corev1.Pod) error {
	pods := suite.client.CoreV1().Pods(p.Namespace)
	if err := pods.Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		got, err := pods.Get(ctx, p.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || (err == nil && got.UID != p.UID) {
			return true, nil
		}
		return false, nil
	})
}

func getPod(ctx context.Context, t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	got, err := suite.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// podEvents reads the workload's events from the pod log through the API.
func podEvents(ctx context.Context, p *corev1.Pod, container string) ([]event, error) {
	raw, err := suite.client.CoreV1().Pods(p.Namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	var out []event
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e event
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Event != "" {
			out = append(out, e)
		}
	}
	return out, nil
}

// waitEvent polls the pod log until an event satisfies match; it returns
// that event and every event read so far.
func waitEvent(ctx context.Context, t *testing.T, p *corev1.Pod, timeout time.Duration, what string, match func(event) bool) (event, []event) {
	t.Helper()
	var all []event
	var found *event
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		evs, err := podEvents(ctx, p, p.Spec.Containers[0].Name)
		if err != nil {
			lastErr = err
			return false, nil
		}
		all = evs
		for i := range evs {
			if match(evs[i]) {
				found = &evs[i]
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		cur, _ := suite.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		state := ""
		if cur != nil {
			state = framework.PodSummary(cur)
		}
		t.Fatalf("%s/%s: no %s within %s (last log error: %v; pod: %s; events: %s)\nlog: %s",
			p.Namespace, p.Name, what, timeout, lastErr, state, podK8sEvents(ctx, p), describeEvents(all))
	}
	return *found, all
}

func firstSVID(ctx context.Context, t *testing.T, p *corev1.Pod) (event, []event) {
	t.Helper()
	return waitEvent(ctx, t, p, 90*time.Second, "X.509-SVID", func(e event) bool { return e.Event == "x509" })
}

func describeEvents(evs []event) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "\n  %s %s ids=%v serials=%v verified=%v code=%s err=%s errno=%s", e.Time.Format("15:04:05.000"), e.Event, e.IDs, e.Serials, e.Verified, e.Code, e.Error, e.Errno)
	}
	return b.String()
}

// podK8sEvents lists the API events about a pod, for failure messages.
func podK8sEvents(ctx context.Context, p *corev1.Pod) string {
	l, err := suite.client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range l.Items {
		fmt.Fprintf(&b, "\n  %s %s: %s", e.Type, e.Reason, e.Message)
	}
	return b.String()
}

func waitRunning(ctx context.Context, t *testing.T, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	var cur *corev1.Pod
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := suite.client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		cur = got
		return got.Status.Phase == corev1.PodRunning && len(got.Status.ContainerStatuses) > 0 && got.Status.ContainerStatuses[0].ContainerID != "", nil
	})
	if err != nil {
		t.Fatalf("pod not running: %s %s", framework.PodSummary(cur), podK8sEvents(ctx, p))
	}
	return cur
}

func recordsOf(ctx context.Context, t *testing.T, podUID string) []records.Record {
	t.Helper()
	all, err := suite.node.Records(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []records.Record
	for _, r := range all {
		if r.PodUID == podUID {
			out = append(out, r)
		}
	}
	return out
}

// csiTarget is where the kubelet asks the driver to publish a pod's volume.
func csiTarget(p *corev1.Pod, volume string) string {
	return fmt.Sprintf("%s/pods/%s/volumes/kubernetes.io~csi/%s/mount", suite.node.KubeletRootDir(), p.UID, volume)
}

func mountsAt(ctx context.Context, t *testing.T, path string) []framework.Mount {
	t.Helper()
	ms, err := suite.node.Mounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return framework.MountsAt(ms, path)
}

func podMounts(ctx context.Context, t *testing.T, uid string) []framework.Mount {
	t.Helper()
	ms, err := suite.node.Mounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return framework.MountsUnder(ms, suite.node.KubeletRootDir()+"/pods/"+uid)
}

func sameIDs(got []string, want ...string) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}
