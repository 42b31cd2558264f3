package k8s

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/records"
)

// fakeLister answers from a function of the request number (1-based) and
// notes the clock time of every request.
type fakeLister struct {
	clock  interface{ Now() time.Time }
	answer func(n int) ([]byte, error)
	delay  time.Duration // real time each request takes

	mu    sync.Mutex
	times []time.Time
}

func (f *fakeLister) ListPods(ctx context.Context) ([]byte, error) {
	f.mu.Lock()
	f.times = append(f.times, f.clock.Now())
	n := len(f.times)
	f.mu.Unlock()
	if f.delay > 0 {
		time.Sleep(f.delay)
	}
	return f.answer(n)
}

func (f *fakeLister) requestTimes() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.times...)
}

func podListJSON(t testing.TB, pods ...corev1.Pod) []byte {
	t.Helper()
	body, err := json.Marshal(corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, Items: pods})
	if err != nil {
		t.Fatal(err)
	}
	return body
}

func always(body []byte) func(int) ([]byte, error) {
	return func(int) ([]byte, error) { return body, nil }
}

// procRoot is a stand-in for /proc holding only <pid>/cgroup files.
type procRoot struct {
	t   testing.TB
	dir string
}

func newProcRoot(t testing.TB) *procRoot { return &procRoot{t: t, dir: t.TempDir()} }

// put gives pid a cgroup v1 hybrid file placing it in pod uid, container cid.
func (p *procRoot) put(pid int, uid, cid string) {
	path := "/kubepods/burstable/pod" + uid
	if cid != "" {
		path += "/" + cid
	}
	p.putRaw(pid, fmt.Sprintf("12:pids:%s\n8:memory:%s\n1:name=systemd:%s\n0::/\n", path, path, path))
}

func (p *procRoot) putRaw(pid int, content string) {
	dir := filepath.Join(p.dir, strconv.Itoa(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(content), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

func openRecords(_ testing.TB, recs ...records.Record) memRecords {
	m := memRecords{}
	for _, r := range recs {
		m[r.PodUID] = append(m[r.PodUID], r)
	}
	return m
}

func recordFor(p corev1.Pod) records.Record {
	return records.Record{
		VolumeID:       "csi-" + string(p.UID),
		PodUID:         string(p.UID),
		PodNamespace:   p.Namespace,
		PodName:        p.Name,
		ServiceAccount: p.Spec.ServiceAccountName,
		TargetPath:     "/var/lib/kubelet/pods/" + string(p.UID) + "/volumes/kubernetes.io~csi/spiffe/mount",
		PublishedAt:    time.Unix(1700000000, 0),
	}
}

// testOptions fills what internal/config would, with the same values.
func testOptions(opts Options) Options {
	if opts.ProcRoot == "" {
		opts.ProcRoot = "/proc"
	}
	if opts.CrossCheck == "" {
		opts.CrossCheck = CrossCheckEnforce
	}
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{
		{&opts.MinRefreshInterval, testMinRefreshInterval},
		{&opts.RetryBudget, 30 * time.Second},
		{&opts.ContainerWait, 600 * time.Millisecond},
		{&opts.MaxCacheAge, 5 * time.Second},
		{&opts.RequestTimeout, 10 * time.Second},
	} {
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	return opts
}

const testMinRefreshInterval = 250 * time.Millisecond

// memRecords are mount records held in memory.
type memRecords map[string][]records.Record

func (m memRecords) ByPodUID(uid string) []records.Record { return m[uid] }

func newAttestor(t testing.TB, opts Options) *Attestor {
	t.Helper()
	a, err := New(testOptions(opts))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return a
}

// drive steps the fake clock whenever someone waits on it and no kubelet
// request is running (that one takes no clock time), until done closes.
func drive(a *Attestor, fc *clocktesting.FakeClock, step time.Duration, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		default:
		}
		if fc.HasWaiters() && a.cache.idle() {
			// Let goroutines just woken reach their next wait before moving on.
			time.Sleep(time.Millisecond)
			select {
			case <-done:
				return
			default:
			}
			if fc.HasWaiters() && a.cache.idle() {
				fc.Step(step)
			}
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
}

type result struct {
	attrs attestor.Attributes
	err   error
}

func attestDriven(a *Attestor, fc *clocktesting.FakeClock, step time.Duration, pid int32) result {
	done := make(chan struct{})
	var r result
	go func() {
		defer close(done)
		r.attrs, r.err = a.Attest(context.Background(), pid)
	}()
	drive(a, fc, step, done)
	return r
}

// captureLogs routes klog to a buffer for the test.
func captureLogs(t *testing.T) func() string {
	var mu sync.Mutex
	var lines []string
	klog.SetLogger(funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, args)
	}, funcr.Options{}))
	t.Cleanup(klog.ClearLogger)
	return func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.ReplaceAll(strings.Join(lines, "\n"), `\"`, `"`)
	}
}

// richPod has every kind of container and fact the attestor reports.
func richPod() corev1.Pod {
	p := newPod("shop", "web-7d9f", uidN(1), "web-sa")
	p.Labels = map[string]string{"app": "web", "app.kubernetes.io/version": "1.2"}
	p = withOwner(p, "ReplicaSet", "web-7d9f5c", "11111111-2222-4333-8444-555555555555")
	p = withInit(p, "migrate", "migrate:3", cidN(11), false)
	p = withInit(p, "proxy", "envoy:1.30", cidN(12), true)
	p = withContainer(p, "app", "nginx:1.27", cidN(13))
	p = withContainer(p, "log", "fluent-bit:3", cidN(14))
	p = withEphemeral(p, "debug", "busybox:1.36", cidN(15))
	return p
}

func TestAttestReportsPodAndContainer(t *testing.T) {
	pod := richPod()
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	for i := 11; i <= 15; i++ {
		procs.put(1000+i, uidN(1), cidN(i))
	}
	a := newAttestor(t, Options{
		ProcRoot: procs.dir,
		Pods:     &fakeLister{clock: fc, answer: always(podListJSON(t, pod, newPod("other", "x", uidN(2), "default")))},
		Records:  openRecords(t, recordFor(pod)),
		NodeName: "ignored-when-spec-has-it",
		Clock:    fc,
	})

	got := attestDriven(a, fc, 10*time.Millisecond, 1013)
	if got.err != nil {
		t.Fatal(got.err)
	}
	digest := "@sha256:" + strings.Repeat("ab", 32)
	want := attestor.Attributes{
		field.K8sNamespace:              {"shop"},
		field.K8sPodName:                {"web-7d9f"},
		field.K8sPodUID:                 {uidN(1)},
		field.K8sServiceAccount:         {"web-sa"},
		field.K8sNodeName:               {"node-a"},
		field.K8sPodLabelPrefix + "app": {"web"},
		field.K8sPodLabelPrefix + "app.kubernetes.io/version": {"1.2"},
		field.K8sPodOwnerKind: {"ReplicaSet"},
		field.K8sPodOwnerName: {"web-7d9f5c"},
		field.K8sPodOwnerUID:  {"11111111-2222-4333-8444-555555555555"},
		field.K8sPodImage: {"nginx:1.27", "fluent-bit:3",
			"docker.io/library/nginx:1.27", "docker.io/library/nginx" + digest,
			"docker.io/library/fluent-bit:3", "docker.io/library/fluent-bit" + digest},
		field.K8sPodImageCount: {"2"},
		field.K8sPodInitImage: {"migrate:3", "envoy:1.30",
			"docker.io/library/migrate:3", "docker.io/library/migrate" + digest,
			"docker.io/library/envoy:1.30", "docker.io/library/envoy" + digest},
		field.K8sPodInitImageCount: {"2"},
		field.K8sContainerID:       {cidN(13)},
		field.K8sContainerName:     {"app"},
		field.K8sContainerType:     {"container"},
		field.K8sContainerImage:    {"docker.io/library/nginx:1.27"},
		field.K8sContainerImageID:  {"docker.io/library/nginx" + digest},
	}
	if !reflect.DeepEqual(got.attrs, want) {
		t.Fatalf("attributes:\n got %s\nwant %s", got.attrs, want)
	}

	types := map[int32][2]string{
		1011: {"migrate", ContainerTypeInit},
		1012: {"proxy", ContainerTypeSidecar},
		1014: {"log", ContainerTypeContainer},
		1015: {"debug", ContainerTypeEphemeral},
	}
	for pid, w := range types {
		got := attestDriven(a, fc, 10*time.Millisecond, pid)
		if got.err != nil {
			t.Fatalf("pid %d: %v", pid, got.err)
		}
		if name, _ := got.attrs.Get(field.K8sContainerName); name != w[0] {
			t.Errorf("pid %d: container name %q, want %q", pid, name, w[0])
		}
		if typ, _ := got.attrs.Get(field.K8sContainerType); typ != w[1] {
			t.Errorf("pid %d: container type %q, want %q", pid, typ, w[1])
		}
	}
	if n := a.KubeletRequests(); n != 1 {
		t.Fatalf("five attestations of one pod made %d kubelet requests, want 1", n)
	}
}

func TestAttestOutsidePods(t *testing.T) {
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.putRaw(10, "0::/system.slice/sshd.service\n")
	procs.putRaw(11, "1:cpu:/kubepods/pod"+uidN(1)+"/"+cidN(1)+"\n0::/kubepods/pod"+uidN(2)+"/"+cidN(1)+"\n")
	a := newAttestor(t, Options{
		ProcRoot: procs.dir,
		Pods:     &fakeLister{clock: fc, answer: always(podListJSON(t))},
		Records:  openRecords(t),
		Clock:    fc,
	})
	attrs, err := a.Attest(context.Background(), 10)
	if attrs != nil || err != nil {
		t.Fatalf("host process: (%v, %v), want (nil, nil)", attrs, err)
	}
	for _, tc := range []struct {
		pid  int32
		want string
	}{
		{11, "conflicts"},    // cgroup lines disagree
		{12, "is gone"},      // no such process
		{0, "PID namespace"}, // caller outside our PID namespace
		{-1, "PID namespace"},
	} {
		_, err := a.Attest(context.Background(), tc.pid)
		if !errors.Is(err, attestor.ErrDenied) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("pid %d: err = %v, want Denied containing %q", tc.pid, err, tc.want)
		}
	}
	if n := a.KubeletRequests(); n != 0 {
		t.Fatalf("%d kubelet requests for callers outside pods", n)
	}
}

func TestAttestCrossCheck(t *testing.T) {
	pod := withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1))
	good := recordFor(pod)
	other := func(f func(*records.Record)) records.Record {
		r := good
		f(&r)
		return r
	}
	second := other(func(r *records.Record) { r.TargetPath += "-2" })
	tests := []struct {
		name    string
		records []records.Record
		reason  string // "" when the records vouch for the pod
	}{
		{"matching record", []records.Record{good}, ""},
		{"two matching records", []records.Record{good, second}, ""},
		{"no record (hostPath socket)", nil, "no csi-agent volume mount record"},
		{"record of another pod only", []records.Record{other(func(r *records.Record) { r.PodUID = uidN(9) })}, "no csi-agent volume mount record"},
		{"namespace differs", []records.Record{other(func(r *records.Record) { r.PodNamespace = "bank" })}, `namespace "bank"`},
		{"name differs", []records.Record{other(func(r *records.Record) { r.PodName = "web-2" })}, `pod name "web-2"`},
		{"service account differs", []records.Record{other(func(r *records.Record) { r.ServiceAccount = "admin" })}, `service account "admin", kubelet says "web-sa"`},
		{"one of two records differs", []records.Record{good, other(func(r *records.Record) { r.TargetPath += "-2"; r.ServiceAccount = "admin" })}, `service account "admin"`},
	}
	for _, tt := range tests {
		for _, mode := range []CrossCheck{CrossCheckEnforce, CrossCheckWarn, CrossCheckOff} {
			t.Run(tt.name+"/"+string(mode), func(t *testing.T) {
				logs := captureLogs(t)
				fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
				procs := newProcRoot(t)
				procs.put(42, uidN(1), cidN(1))
				a := newAttestor(t, Options{
					ProcRoot:   procs.dir,
					Pods:       &fakeLister{clock: fc, answer: always(podListJSON(t, pod))},
					Records:    openRecords(t, tt.records...),
					CrossCheck: mode,
					Clock:      fc,
				})
				got := attestDriven(a, fc, 10*time.Millisecond, 42)
				if tt.reason == "" || mode != CrossCheckEnforce {
					if got.err != nil {
						t.Fatalf("err = %v, want attested", got.err)
					}
					if sa, _ := got.attrs.Get(field.K8sServiceAccount); sa != "web-sa" {
						t.Fatalf("service account %q: the kubelet is the authority, not the record", sa)
					}
					if tt.reason != "" && mode == CrossCheckWarn && !strings.Contains(logs(), tt.reason) {
						t.Fatalf("warn mode did not log %q; logs:\n%s", tt.reason, logs())
					}
					return
				}
				if !errors.Is(got.err, attestor.ErrDenied) || !strings.Contains(got.err.Error(), tt.reason) {
					t.Fatalf("err = %v, want Denied with %q", got.err, tt.reason)
				}
				if got.attrs != nil {
					t.Fatalf("denied caller got attributes %s", got.attrs)
				}
				if l := logs(); !strings.Contains(l, "Kubernetes attestation denied") || !strings.Contains(l, tt.reason) {
					t.Fatalf("no audit line with the reason; logs:\n%s", l)
				}
				if len(tt.records) == 0 && a.KubeletRequests() != 0 {
					t.Fatal("a pod without records cost a kubelet request")
				}
			})
		}
	}
}

func TestAttestSharesOneRequestAmong100Callers(t *testing.T) {
	// 110 pods; 100 callers in 100 of them arrive at once on a cold cache.
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	var pods []corev1.Pod
	var recs []records.Record
	for i := 0; i < 110; i++ {
		p := withContainer(newPod("ns"+strconv.Itoa(i%7), "pod-"+strconv.Itoa(i), uidN(i), "sa"), "app", "app:1", cidN(i))
		pods = append(pods, p)
		recs = append(recs, recordFor(p))
		procs.put(2000+i, uidN(i), cidN(i))
	}
	lister := &fakeLister{clock: fc, answer: always(podListJSON(t, pods...)), delay: 20 * time.Millisecond}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recs...), Clock: fc})

	start := make(chan struct{})
	var wg sync.WaitGroup
	var failures atomic.Int32
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			attrs, err := a.Attest(context.Background(), int32(2000+i))
			if err != nil {
				t.Errorf("caller %d: %v", i, err)
				failures.Add(1)
				return
			}
			if name, _ := attrs.Get(field.K8sPodName); name != "pod-"+strconv.Itoa(i) {
				t.Errorf("caller %d got pod %q", i, name)
			}
			if id, _ := attrs.Get(field.K8sContainerID); id != cidN(i) {
				t.Errorf("caller %d got container %q", i, id)
			}
		}(i)
	}
	close(start)
	wg.Wait()
	// The fake clock never moved: a second request would break the interval.
	if n := a.KubeletRequests(); n != 1 {
		t.Fatalf("100 concurrent attestations made %d kubelet requests, want 1", n)
	}
}

func TestAttestRetriesUntilPodListed(t *testing.T) {
	pod := withContainer(newPod("shop", "new", uidN(1), "sa"), "app", "app:1", cidN(1))
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	without, with := podListJSON(t), podListJSON(t, pod)
	lister := &fakeLister{clock: fc, answer: func(n int) ([]byte, error) {
		if n < 4 {
			return without, nil
		}
		return with, nil
	}}
	const interval = 300 * time.Millisecond
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(pod)),
		MinRefreshInterval: interval, Clock: fc})

	got := attestDriven(a, fc, 7*time.Millisecond, 7)
	if got.err != nil {
		t.Fatal(got.err)
	}
	if name, _ := got.attrs.Get(field.K8sContainerName); name != "app" {
		t.Fatalf("attributes %s", got.attrs)
	}
	times := lister.requestTimes()
	if len(times) != 4 {
		t.Fatalf("%d requests, want 4", len(times))
	}
	for i := 1; i < len(times); i++ {
		if gap := times[i].Sub(times[i-1]); gap < interval {
			t.Fatalf("requests %d and %d only %v apart, interval %v", i, i+1, gap, interval)
		}
	}
}

func TestAttestGivesUpOnUnlistedPodAfterBudget(t *testing.T) {
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	pod := newPod("shop", "ghost", uidN(1), "sa")
	lister := &fakeLister{clock: fc, answer: always(podListJSON(t))}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(pod)),
		MinRefreshInterval: 500 * time.Millisecond, RetryBudget: 3 * time.Second, Clock: fc})

	start := fc.Now()
	got := attestDriven(a, fc, 10*time.Millisecond, 7)
	if !errors.Is(got.err, attestor.ErrUnavailable) || !strings.Contains(got.err.Error(), "not listed") {
		t.Fatalf("err = %v, want Unavailable: not listed", got.err)
	}
	if waited := fc.Since(start); waited < 3*time.Second || waited > 3*time.Second+200*time.Millisecond {
		t.Fatalf("gave up after %v of clock time, budget 3s", waited)
	}
	if n := a.KubeletRequests(); n < 6 || n > 7 {
		t.Fatalf("%d requests in a 3s budget at one per 500ms", n)
	}
}

func TestAttestContainerNotYetReported(t *testing.T) {
	// postStart: the pod is listed, the caller's container has no ID in the status yet.
	starting := withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", "")
	started := withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1))
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	var ready atomic.Bool
	lister := &fakeLister{clock: fc, answer: func(int) ([]byte, error) {
		if ready.Load() {
			return podListJSON(t, started), nil
		}
		return podListJSON(t, starting), nil
	}}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(started)), Clock: fc})

	start := fc.Now()
	got := attestDriven(a, fc, 10*time.Millisecond, 7)
	if got.err != nil {
		t.Fatal(got.err)
	}
	if waited := fc.Since(start); waited > time.Second {
		t.Fatalf("pod-level answer took %v of clock time", waited)
	}
	if uid, _ := got.attrs.Get(field.K8sPodUID); uid != uidN(1) {
		t.Fatalf("attributes %s lack the pod UID", got.attrs)
	}
	for _, f := range []string{field.K8sContainerID, field.K8sContainerName, field.K8sContainerType, field.K8sContainerImage, field.K8sContainerImageID} {
		if _, ok := got.attrs[f]; ok {
			t.Fatalf("container field %s present before the kubelet reported the container: %s", f, got.attrs)
		}
	}
	if n := a.KubeletRequests(); n > 4 {
		t.Fatalf("%d requests within the container wait", n)
	}

	ready.Store(true)
	got = attestDriven(a, fc, 10*time.Millisecond, 7)
	if name, _ := got.attrs.Get(field.K8sContainerName); got.err != nil || name != "app" {
		t.Fatalf("after the status update: (%s, %v)", got.attrs, got.err)
	}
}

func TestAttestNoContainerWaitAnswersAtOnce(t *testing.T) {
	// With no rule reading container fields the agent sets the wait to zero:
	// a caller whose container is not listed yet is answered without any
	// clock time passing, from the first pod list.
	starting := withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", "")
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	lister := &fakeLister{clock: fc, answer: always(podListJSON(t, starting))}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(starting)), Clock: fc})

	start := fc.Now()
	var got result
	got.attrs, got.err = a.AttestWithContainerWait(context.Background(), 7, 0)
	if got.err != nil {
		t.Fatal(got.err)
	}
	if waited := fc.Since(start); waited != 0 {
		t.Fatalf("answer took %v of clock time, want none", waited)
	}
	if ns, _ := got.attrs.Get(field.K8sNamespace); ns != "shop" {
		t.Fatalf("attributes %s lack the namespace", got.attrs)
	}
	if _, ok := got.attrs[field.K8sContainerName]; ok {
		t.Fatalf("container field before the kubelet listed it: %s", got.attrs)
	}
	if n := a.KubeletRequests(); n != 1 {
		t.Fatalf("%d kubelet requests, want 1", n)
	}
}

func TestAttestKubeletDownThenBack(t *testing.T) {
	pod := withContainer(newPod("shop", "web", uidN(1), "sa"), "app", "app:1", cidN(1))
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	var down atomic.Bool
	down.Store(true)
	cause := errors.New("dial tcp 127.0.0.1:10250: connect: connection refused")
	lister := &fakeLister{clock: fc, answer: func(int) ([]byte, error) {
		if down.Load() {
			return nil, fmt.Errorf("%w: %w", attestor.ErrUnavailable, cause)
		}
		return podListJSON(t, pod), nil
	}}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(pod)), Clock: fc})

	// No clock movement needed: a failed request answers at once.
	_, err := a.Attest(context.Background(), 7)
	if !errors.Is(err, attestor.ErrUnavailable) || !errors.Is(err, cause) {
		t.Fatalf("err = %v, want Unavailable with the cause", err)
	}
	down.Store(false)
	got := attestDriven(a, fc, 10*time.Millisecond, 7)
	if got.err != nil {
		t.Fatal(got.err)
	}
	if n := a.KubeletRequests(); n != 2 {
		t.Fatalf("%d requests, want 2", n)
	}
}

func TestAttestMalformedPodListIsUnavailable(t *testing.T) {
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	pod := newPod("shop", "web", uidN(1), "sa")
	for name, body := range map[string][]byte{
		"not json":      []byte("<html>hello</html>"),
		"duplicate uid": podListJSON(t, pod, pod),
		"wrong types":   []byte(`{"items":[{"metadata":{"uid":7}}]}`),
	} {
		t.Run(name, func(t *testing.T) {
			a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: &fakeLister{clock: fc, answer: always(body)},
				Records: openRecords(t, recordFor(pod)), Clock: fc})
			if _, err := a.Attest(context.Background(), 7); !errors.Is(err, attestor.ErrUnavailable) {
				t.Fatalf("err = %v, want Unavailable", err)
			}
		})
	}
}

func TestAttestCacheReuseAndMaxAge(t *testing.T) {
	a1 := withContainer(newPod("shop", "a", uidN(1), "sa"), "app", "app:1", cidN(1))
	a2 := withContainer(newPod("shop", "b", uidN(2), "sa"), "app", "app:1", cidN(2))
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(1, uidN(1), cidN(1))
	procs.put(2, uidN(2), cidN(2))
	var list atomic.Value
	list.Store(podListJSON(t, a1))
	lister := &fakeLister{clock: fc, answer: func(int) ([]byte, error) { return list.Load().([]byte), nil }}
	a := newAttestor(t, Options{ProcRoot: procs.dir, Pods: lister, Records: openRecords(t, recordFor(a1), recordFor(a2)),
		MinRefreshInterval: time.Second, MaxCacheAge: 10 * time.Second, Clock: fc})

	if r := attestDriven(a, fc, 10*time.Millisecond, 1); r.err != nil {
		t.Fatal(r.err)
	}
	fc.Step(5 * time.Second)
	if _, err := a.Attest(context.Background(), 1); err != nil { // served from the list, no clock needed
		t.Fatal(err)
	}
	if n := a.KubeletRequests(); n != 1 {
		t.Fatalf("%d requests, want the list reused", n)
	}

	// A label change shows once the list is older than MaxCacheAge.
	a1.Labels["tier"] = "gold"
	list.Store(podListJSON(t, a1, a2))
	fc.Step(6 * time.Second)
	r := attestDriven(a, fc, 10*time.Millisecond, 1)
	if r.err != nil || !r.attrs.Has(field.K8sPodLabelPrefix+"tier", "gold") {
		t.Fatalf("after max age: (%s, %v)", r.attrs, r.err)
	}
	if n := a.KubeletRequests(); n != 2 {
		t.Fatalf("%d requests, want 2", n)
	}
	// A new pod right after a request waits for the interval, then one request.
	before := fc.Now()
	list.Store(podListJSON(t, a1, a2))
	procs.put(3, uidN(3), cidN(3))
	r = attestDriven(a, fc, 10*time.Millisecond, 2)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if n := a.KubeletRequests(); n != 2 {
		t.Fatalf("pod b was in the last list; %d requests, want 2", n)
	}
	if fc.Since(before) != 0 {
		t.Fatal("a listed pod waited")
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	lister := &fakeLister{clock: clocktesting.NewFakeClock(time.Now()), answer: always(nil)}
	store := openRecords(t)
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"no lister", Options{Records: store}, "pod lister"},
		{"no records", Options{Pods: lister}, "records"},
		{"bad mode", Options{Pods: lister, Records: store, CrossCheck: "strict"}, `"enforce", "warn" or "off"`},
		{"negative interval", Options{Pods: lister, Records: store, MinRefreshInterval: -1}, "negative"},
		{"container wait beyond budget", Options{Pods: lister, Records: store, RetryBudget: time.Second, ContainerWait: 2 * time.Second}, "exceeds"},
		{"negative request timeout", Options{Pods: lister, Records: store, RequestTimeout: -1}, "not positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(testOptions(tt.opts))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
	if _, err := New(testOptions(Options{Pods: lister, CrossCheck: CrossCheckOff})); err != nil {
		t.Fatalf("cross-check off needs no records: %v", err)
	}
	// Components take no defaults: internal/config fills every option.
	if _, err := New(Options{Pods: lister, CrossCheck: CrossCheckOff, RequestTimeout: time.Second}); err == nil || !strings.Contains(err.Error(), "proc root") {
		t.Fatalf("no proc root: err = %v", err)
	}
	if _, err := New(Options{ProcRoot: "/proc", Pods: lister, Records: store}); err == nil || !strings.Contains(err.Error(), "cross-check") {
		t.Fatalf("no cross-check mode: err = %v", err)
	}
}

func TestParseCrossCheck(t *testing.T) {
	for _, s := range []string{"enforce", "warn", "off"} {
		if m, err := ParseCrossCheck(s); err != nil || string(m) != s {
			t.Errorf("ParseCrossCheck(%q) = %q, %v", s, m, err)
		}
	}
	for _, s := range []string{"", "Enforce", "on", "disabled"} {
		if _, err := ParseCrossCheck(s); err == nil || !strings.Contains(err.Error(), "enforce") {
			t.Errorf("ParseCrossCheck(%q) err = %v", s, err)
		}
	}
}

func (c *podCache) idle() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inflight == nil
}

// A request that fails before its starter looks again must still be that
// caller's answer: no second request, no waiting for the interval.
func TestAttestFastFailureIsTheStartersAnswer(t *testing.T) {
	fc := clocktesting.NewFakeClock(time.Unix(1700000000, 0))
	procs := newProcRoot(t)
	procs.put(7, uidN(1), cidN(1))
	store := openRecords(t, recordFor(newPod("shop", "web", uidN(1), "sa")))
	cause := errors.New("connection refused")
	for i := 0; i < 50; i++ {
		a := newAttestor(t, Options{ProcRoot: procs.dir, Records: store, Clock: fc,
			Pods: &fakeLister{clock: fc, answer: func(int) ([]byte, error) { return nil, cause }}})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := a.Attest(ctx, 7)
		cancel()
		if !errors.Is(err, cause) {
			t.Fatalf("attempt %d: err = %v, want the request's error", i, err)
		}
		if n := a.KubeletRequests(); n != 1 {
			t.Fatalf("attempt %d: %d requests, want 1", i, n)
		}
	}
}
