package k8s

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"github.com/csi-agent/csi-agent/internal/records"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// The same attestation through a KubeletClient, 100 callers at once on a
// node of 110 pods, with the real clock: requests stay within one per interval.
func TestAttest100ConcurrentOverTLS(t *testing.T) {
	k, a, pids := benchSetup(t)
	const interval = testMinRefreshInterval
	start := time.Now()
	errs := make(chan error, len(pids))
	for _, pid := range pids {
		go func(pid int32) {
			attrs, err := a.Attest(context.Background(), pid)
			if err == nil && attrs == nil {
				err = errors.New("no attributes")
			}
			errs <- err
		}(pid)
	}
	for range pids {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	allowed := 1 + uint64(elapsed/interval)
	if n := a.KubeletRequests(); n > allowed || n == 0 {
		t.Fatalf("%d kubelet requests in %v (interval %v), allowed %d", n, elapsed, interval, allowed)
	}
	if served := uint64(k.requests.Load()); served != a.KubeletRequests() {
		t.Fatalf("kubelet served %d requests, attestor counted %d", served, a.KubeletRequests())
	}
}

// benchSetup builds a TLS kubelet stand-in with 110 pods and a proc root
// whose 100 processes sit in 100 of them.
func benchSetup(tb testing.TB) (*kubeletStandIn, *Attestor, []int32) {
	tb.Helper()
	ca := newTestCA(tb, "kubelet-ca")
	k := startKubelet(tb, standInOptions{
		tls:   &tls.Config{Certificates: []tls.Certificate{ca.serving(tb, []string{"node-a"}, nil)}},
		token: "agent-token",
	})
	dir := tb.TempDir()
	procs := newProcRoot(tb)
	var pods []corev1.Pod
	store := openRecords(tb)
	var pids []int32
	for i := 0; i < 110; i++ {
		p := richPodN(i)
		pods = append(pods, p)
		store[string(p.UID)] = []records.Record{recordFor(p)}
		if i < 100 {
			procs.put(3000+i, uidN(100+i), cidN(1000+i))
			pids = append(pids, int32(3000+i))
		}
	}
	k.setPods(pods...)
	client, err := NewKubeletClient(testKubelet(KubeletConfig{
		Port:      k.port(),
		NodeName:  "node-a",
		CAFile:    writeFile(tb, dir, "ca.crt", ca.pem),
		TokenFile: writeFile(tb, dir, "token", []byte("agent-token")),
	}))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(client.Close)
	a, err := New(testOptions(Options{ProcRoot: procs.dir, Pods: client, Records: store, NodeName: "node-a"}))
	if err != nil {
		tb.Fatal(err)
	}
	return k, a, pids
}

// richPodN is a realistically sized pod: labels, annotations, env, volumes,
// probes, two containers and a sidecar.
func richPodN(i int) corev1.Pod {
	p := newPod("ns-"+strconv.Itoa(i%12), "workload-"+strconv.Itoa(i), uidN(100+i), "sa-"+strconv.Itoa(i%5))
	p = withOwner(p, "ReplicaSet", "workload-rs-"+strconv.Itoa(i), uidN(5000+i))
	p = withInit(p, "proxy", "envoy:1.30", cidN(3000+i), true)
	p = withContainer(p, "app", "registry.example/app:"+strconv.Itoa(i), cidN(1000+i))
	p = withContainer(p, "metrics", "prom/exporter:1", cidN(2000+i))
	p.Labels["pod-template-hash"] = "5c" + strconv.Itoa(i)
	p.Labels["app.kubernetes.io/part-of"] = "shop"
	p.Annotations = map[string]string{
		"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat(`{"apiVersion":"v1","kind":"Pod"}`, 40),
		"prometheus.io/scrape":                             "true",
	}
	for c := range p.Spec.Containers {
		for e := 0; e < 15; e++ {
			p.Spec.Containers[c].Env = append(p.Spec.Containers[c].Env, corev1.EnvVar{Name: "VAR_" + strconv.Itoa(e), Value: strings.Repeat("x", 40)})
		}
		p.Spec.Containers[c].VolumeMounts = []corev1.VolumeMount{{Name: "spiffe", MountPath: "/run/spiffe", ReadOnly: true}}
		p.Spec.Containers[c].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"/bin/check", "--ready"}}}}
	}
	ro := true
	p.Spec.Volumes = []corev1.Volume{{Name: "spiffe", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: "csi.csi-agent.io", ReadOnly: &ro}}}}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}, {Type: corev1.ContainersReady, Status: corev1.ConditionTrue}}
	p.Status.PodIP = "10.244.0." + strconv.Itoa(i)
	return p
}

// BenchmarkAttest100Concurrent110Pods: bursts of 100 concurrent attestations
// on a node of 110 pods, through the real KubeletClient over TLS.
// "cold" starts each burst with a new attestor (empty cache: the burst shares
// one kubelet request); "warm" reuses one attestor across bursts.
func BenchmarkAttest100Concurrent110Pods(b *testing.B) {
	for _, mode := range []string{"cold", "warm"} {
		b.Run(mode, func(b *testing.B) {
			k, a, pids := benchSetup(b)
			client := a.cache.lister
			// One burst first, so the TLS handshake is not in the numbers.
			for _, pid := range pids {
				if _, err := a.Attest(context.Background(), pid); err != nil {
					b.Fatal(err)
				}
			}
			served := k.requests.Load()
			var latencies []time.Duration
			var requests uint64
			uncounted := a.KubeletRequests() // the warm-up's
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if mode == "cold" {
					fresh, err := New(testOptions(Options{ProcRoot: a.proc.Root(), Pods: client, Records: a.records, NodeName: "node-a"}))
					if err != nil {
						b.Fatal(err)
					}
					requests += a.KubeletRequests() - uncounted
					uncounted = 0
					a = fresh
				}
				lat := make([]time.Duration, len(pids))
				var wg sync.WaitGroup
				for j, pid := range pids {
					wg.Add(1)
					go func(j int, pid int32) {
						defer wg.Done()
						start := time.Now()
						if _, err := a.Attest(context.Background(), pid); err != nil {
							b.Error(err)
						}
						lat[j] = time.Since(start)
					}(j, pid)
				}
				wg.Wait()
				latencies = append(latencies, lat...)
			}
			b.StopTimer()
			requests += a.KubeletRequests() - uncounted
			sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
			pct := func(p float64) float64 {
				return float64(latencies[int(p*float64(len(latencies)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(pct(0.50), "p50-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
			b.ReportMetric(float64(requests)/float64(b.N), "kubelet-req/burst")
			b.ReportMetric(float64(k.requests.Load()-served)/float64(b.N), "served-req/burst")
		})
	}
}

// BenchmarkParsePodList110 measures decoding one node's pod list, against
// decoding it into full v1.Pod objects for reference.
func BenchmarkParsePodList110(b *testing.B) {
	var pods []corev1.Pod
	for i := 0; i < 110; i++ {
		pods = append(pods, richPodN(i))
	}
	body := podListJSON(b, pods...)
	b.Run("minimal", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := parsePodList(body); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("full-v1-reference", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			var l corev1.PodList
			if err := json.Unmarshal(body, &l); err != nil {
				b.Fatal(err)
			}
		}
	})
}
