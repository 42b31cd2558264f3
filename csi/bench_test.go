package csi

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/mount-utils"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// BenchmarkPublishUnpublish measures NodePublishVolume and
// NodeUnpublishVolume with real mounts and the durable record (fsync of the
// record and its directory), for the default mounter and for mount-utils
// running mount(8). Target: publish p50 under 2 ms.
func BenchmarkPublishUnpublish(b *testing.B) {
	testutil.RequireRoot(b)
	for _, bc := range []struct {
		name     string
		mounter  func() Mounter
		stateDir string // "" for the test's disk-backed temp dir
	}{
		{"mounter=default", func() Mounter { return nil }, ""},
		{"mounter=mount-utils-exec", func() Mounter { return kernelMounter{exec: mount.New("")} }, ""},
		// The same with records on tmpfs: what the driver costs without the
		// disk's fsync latency (not durable; for comparison only).
		{"mounter=default/state=tmpfs", func() Mounter { return nil }, "/dev/shm"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e := newEnvWithMounter(b, bc.mounter())
			if bc.stateDir != "" {
				dir, err := os.MkdirTemp(bc.stateDir, "csi-agent-bench-")
				if err != nil {
					b.Skipf("no %s: %v", bc.stateDir, err)
				}
				b.Cleanup(func() { os.RemoveAll(dir) })
				e.stateDir = dir
				e.openDriver(b)
			}
			target := e.target(b, testPodUID, "spiffe")
			pubReq := publishReq(testPodUID, target)
			unpubReq := &csipb.NodeUnpublishVolumeRequest{VolumeId: pubReq.VolumeId, TargetPath: target}
			ctx := context.Background()
			pub := make([]time.Duration, 0, b.N)
			unpub := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if _, err := e.node.NodePublishVolume(ctx, pubReq); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if _, err := e.node.NodeUnpublishVolume(ctx, unpubReq); err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				pub = append(pub, t1.Sub(t0))
				unpub = append(unpub, t2.Sub(t1))
			}
			b.StopTimer()
			b.ReportMetric(percentile(pub, 50), "publish-p50-us")
			b.ReportMetric(percentile(pub, 99), "publish-p99-us")
			b.ReportMetric(percentile(unpub, 50), "unpublish-p50-us")
			b.ReportMetric(percentile(unpub, 99), "unpublish-p99-us")
		})
	}
}

// percentile returns the p-th percentile of ds in microseconds.
func percentile(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return float64(s[i]) / float64(time.Microsecond)
}
