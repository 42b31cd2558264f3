package csi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"k8s.io/mount-utils"

	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

func publish(t testing.TB, e *env, req *csipb.NodePublishVolumeRequest) {
	t.Helper()
	if _, err := e.node.NodePublishVolume(context.Background(), req); err != nil {
		t.Fatalf("publish %s: %v", req.TargetPath, err)
	}
}

func unpublish(t testing.TB, e *env, volumeID, target string) {
	t.Helper()
	if _, err := e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target}); err != nil {
		t.Fatalf("unpublish %s: %v", target, err)
	}
}

func TestPublishMountsReadOnlyAndRecords(t *testing.T) {
	for _, tc := range []struct {
		name   string
		newEnv func(testing.TB) *env
	}{
		{"default mounter", func(t testing.TB) *env { testutil.RequireRoot(t); return newEnv(t) }},
		{"mount-utils exec mounter", func(t testing.TB) *env {
			testutil.RequireRoot(t)
			return newEnvWithMounter(t, kernelMounter{exec: mount.New("")})
		}},
		{"fake mounter", newFakeEnv},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.newEnv(t)
			if err := os.WriteFile(filepath.Join(e.socketDir, "probe"), []byte("hello"), 0o644); err != nil {
				t.Fatal(err)
			}
			target := e.target(t, testPodUID, "spiffe")
			before := time.Now().Add(-time.Second)
			publish(t, e, publishReq(testPodUID, target))

			if e.fake == nil {
				checkReadOnlyThroughTarget(t, e, target)
			}
			ms := e.mountsAt(t, target)
			if len(ms) != 1 {
				t.Fatalf("%d mounts at target, want 1", len(ms))
			}
			for _, opt := range []string{"ro", "nosuid", "nodev", "noexec"} {
				if !hasOpts(ms[0], []string{opt}) {
					t.Errorf("mount options %q lack %s", ms[0].Options, opt)
				}
			}

			rec, ok := e.store.ByTarget(target)
			if !ok {
				t.Fatal("no record")
			}
			want := records.Record{VolumeID: "csi-" + testPodUID, PodUID: testPodUID, PodNamespace: testPodNS, PodName: testPodName, ServiceAccount: testSA, TargetPath: target}
			published := rec.PublishedAt
			rec.PublishedAt = time.Time{}
			if rec != want {
				t.Fatalf("record %+v, want %+v", rec, want)
			}
			if published.Before(before) || published.After(time.Now()) {
				t.Errorf("PublishedAt %v out of range", published)
			}
			// The record is durable: a fresh store sees it.
			got, err := records.Load(e.stateDir)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || got[0].TargetPath != target {
				t.Fatalf("reopened store: %+v", got)
			}

			unpublish(t, e, "csi-"+testPodUID, target)
			if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("target still there after unpublish: %v", err)
			}
			if got := e.mountsUnder(t, e.root); len(got) != 0 {
				t.Errorf("mounts left: %v", got)
			}
			if _, ok := e.store.ByTarget(target); ok {
				t.Error("record left after unpublish")
			}
			if _, err := os.Stat(filepath.Join(e.socketDir, "probe")); err != nil {
				t.Errorf("unpublish touched the socket directory: %v", err)
			}
		})
	}
}

// checkReadOnlyThroughTarget checks what only real mounts show: the socket
// directory through the target, and writes refused at the mount.
func checkReadOnlyThroughTarget(t *testing.T, e *env, target string) {
	t.Helper()
	// The socket directory shows through the target.
	if got, err := os.ReadFile(filepath.Join(target, "probe")); err != nil || string(got) != "hello" {
		t.Fatalf("read through target: %q, %v", got, err)
	}
	// Writes fail at the mount, whatever the file permissions say.
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !isErrno(err, unix.EROFS) {
		t.Fatalf("write through target: %v, want EROFS", err)
	}
	if err := os.Remove(filepath.Join(target, "probe")); !isErrno(err, unix.EROFS) {
		t.Fatalf("remove through target: %v, want EROFS", err)
	}
	// A container runtime binds the target into the container; even a
	// "read-write" volumeMount inherits the read-only mount.
	ctr := filepath.Join(e.root, "container-rootfs", "spiffe")
	if err := os.MkdirAll(ctr, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(target, ctr, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ctr, "x"), nil, 0o644); !isErrno(err, unix.EROFS) {
		t.Fatalf("write through the container's bind: %v, want EROFS", err)
	}
	if err := unix.Unmount(ctr, 0); err != nil {
		t.Fatal(err)
	}
}

// A pod connects to the Workload API through the read-only mount.
func TestPublishSocketConnectsThroughReadOnlyMount(t *testing.T) {
	testutil.RequireRoot(t)
	e := newEnv(t)
	ln, err := net.Listen("unix", filepath.Join(e.socketDir, "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		_, _ = c.Write([]byte("echo " + line))
	}()

	target := e.target(t, testPodUID, "spiffe")
	publish(t, e, publishReq(testPodUID, target))

	// The host path is longer than a socket address may be; go through an
	// O_PATH handle on the target, which resolves in the mount all the same.
	fd, err := unix.Open(target, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	viaTarget := fmt.Sprintf("/proc/self/fd/%d/", fd)
	c, err := net.DialTimeout("unix", viaTarget+"agent.sock", 5*time.Second)
	if err != nil {
		t.Fatalf("connect through the read-only mount: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != "echo ping\n" {
		t.Fatalf("reply %q, %v", got, err)
	}
	// Binding a new socket in the mounted directory is a write: refused.
	if l2, err := net.Listen("unix", viaTarget+"rogue.sock"); err == nil {
		l2.Close()
		t.Fatal("listening in the read-only mount succeeded")
	}
}

func TestConcurrentCallsOnOneTarget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		req := publishReq(testPodUID, target)
		// The kubelet retries a call it gave up on while the first still runs.
		var wg sync.WaitGroup
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := e.node.NodePublishVolume(context.Background(), req); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if ms := e.mountsAt(t, target); len(ms) != 1 {
			t.Fatalf("%d mounts after 8 concurrent publishes, want 1", len(ms))
		}
		// Publish and unpublish racing: whatever order they run in, the mount
		// and the record end up agreeing.
		for round := 0; round < 20; round++ {
			var wg sync.WaitGroup
			wg.Add(2)
			go func() {
				defer wg.Done()
				_, _ = e.node.NodePublishVolume(context.Background(), req)
			}()
			go func() {
				defer wg.Done()
				_, _ = e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: target})
			}()
			wg.Wait()
			_, recorded := e.store.ByTarget(target)
			mounts := e.mountsAt(t, target)
			if len(mounts) > 1 || recorded != (len(mounts) == 1) {
				t.Fatalf("round %d: %d mounts, record %v", round, len(mounts), recorded)
			}
		}
	})
}

func TestPublishRepeatedNeverStacks(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		req := publishReq(testPodUID, target)
		publish(t, e, req)
		first, _ := e.store.ByTarget(target)
		for i := 0; i < 100; i++ {
			publish(t, e, req)
		}
		if ms := e.mountsAt(t, target); len(ms) != 1 {
			t.Fatalf("%d mounts at target after 101 publishes, want 1", len(ms))
		}
		if got := e.mountsUnder(t, e.root); len(got) != 1 {
			t.Fatalf("mounts under the test root: %v", got)
		}
		if all := e.store.All(); len(all) != 1 || !all[0].PublishedAt.Equal(first.PublishedAt) {
			t.Fatalf("records after repeated publishes: %+v (first published %v)", all, first.PublishedAt)
		}

		// Another volume id at the same target is a different volume.
		other := publishReq(testPodUID, target)
		other.VolumeId = "csi-other"
		_, err := e.node.NodePublishVolume(context.Background(), other)
		wantCode(t, err, codes.AlreadyExists, "already published for volume csi-"+testPodUID)
	})
}

func TestPublishHealsStackedAndWritableMounts(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		if err := os.Mkdir(target, 0o750); err != nil {
			t.Fatal(err)
		}
		// Two writable binds of the socket dir, as a buggy earlier run could leave.
		for i := 0; i < 2; i++ {
			e.bindSocketDir(t, target, false)
		}
		publish(t, e, publishReq(testPodUID, target))
		ms := e.mountsAt(t, target)
		if len(ms) != 1 || !hasOpts(ms[0], requiredOpts) {
			t.Fatalf("after publish: %d mounts, options %q", len(ms), ms[0].Options)
		}
	})
}

func TestPublishRefusesForeignMount(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		if err := os.Mkdir(target, 0o750); err != nil {
			t.Fatal(err)
		}
		e.mountTmpfs(t, target)
		_, err := e.node.NodePublishVolume(context.Background(), publishReq(testPodUID, target))
		wantCode(t, err, codes.FailedPrecondition, "not ours", "refusing to stack")
		ms := e.mountsAt(t, target)
		if len(ms) != 1 || ms[0].FSType != "tmpfs" {
			t.Fatalf("the foreign mount was touched: %+v", ms)
		}
		if len(e.store.All()) != 0 {
			t.Fatal("a refused publish was recorded")
		}
	})
}

func TestPublishRefusesEscapes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		outside := filepath.Join(e.root, "outside")
		if err := os.MkdirAll(outside, 0o755); err != nil {
			t.Fatal(err)
		}
		csiDir := filepath.Join(e.kubeletRoot, "pods", testPodUID, "volumes", csiVolumesDir)
		if err := os.MkdirAll(csiDir, 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, filepath.Join(csiDir, "evil")); err != nil {
			t.Fatal(err)
		}
		// A pod directory that is itself a symlink out of the kubelet root.
		linkedPod := "22222222-3333-4444-5555-666666666666"
		if err := os.Symlink(outside, filepath.Join(e.kubeletRoot, "pods", linkedPod)); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(outside, "volumes", csiVolumesDir, "v"), 0o755); err != nil {
			t.Fatal(err)
		}
		// The target itself a symlink.
		if err := os.MkdirAll(filepath.Join(csiDir, "linked"), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, filepath.Join(csiDir, "linked", "mount")); err != nil {
			t.Fatal(err)
		}

		tests := []struct {
			name, podUID, target, want string
		}{
			{"outside the kubelet root", testPodUID, filepath.Join(outside, "mount"), "not under the kubelet directory"},
			{"dot-dot", testPodUID, csiDir + "/../../../../../outside/mount", `contains ".."`},
			{"symlinked volume dir", testPodUID, filepath.Join(csiDir, "evil", "mount"), "symlink"},
			{"symlinked target", testPodUID, filepath.Join(csiDir, "linked", "mount"), "symlink"},
			{"symlinked pod dir", linkedPod, filepath.Join(e.kubeletRoot, "pods", linkedPod, "volumes", csiVolumesDir, "v", "mount"), "symlink"},
			{"pod uid mismatch", "33333333-4444-5555-6666-777777777777", filepath.Join(csiDir, "spiffe", "mount"), "belongs to pod " + testPodUID},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				_, err := e.node.NodePublishVolume(context.Background(), publishReq(tc.podUID, tc.target))
				wantCode(t, err, codes.InvalidArgument, tc.want)
			})
		}
		if got := e.mountsUnder(t, e.root); len(got) != 0 {
			t.Fatalf("refused publishes mounted: %v", got)
		}
		entries, _ := os.ReadDir(outside)
		for _, en := range entries {
			if en.Name() != "volumes" {
				t.Errorf("something was created outside: %s", en.Name())
			}
		}
		if _, err := os.Stat(filepath.Join(outside, "volumes", csiVolumesDir, "v", "mount")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("target created through the symlinked pod dir: %v", err)
		}
		// Unpublish does not follow the symlinks either.
		_, err := e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "v", TargetPath: filepath.Join(csiDir, "linked", "mount")})
		wantCode(t, err, codes.InvalidArgument, "symlink")
		if _, err := os.Stat(outside); err != nil {
			t.Fatalf("outside dir damaged: %v", err)
		}
	})
}

// After a node reboot the target is neither mounted nor present, but the
// record survived; the kubelet's unpublish must succeed and clear it.
func TestUnpublishAfterReboot(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		publish(t, e, publishReq(testPodUID, target))
		// "Reboot": the mount and the pod directory are gone.
		e.unmountTop(t, target)
		if err := os.RemoveAll(filepath.Join(e.kubeletRoot, "pods")); err != nil {
			t.Fatal(err)
		}
		e.openDriver(t)
		unpublish(t, e, "csi-"+testPodUID, target)
		if len(e.store.All()) != 0 {
			t.Fatalf("records left: %+v", e.store.All())
		}
		// Never published, never existed: also fine, twice.
		never := filepath.Join(e.kubeletRoot, "pods", "44444444-5555-6666-7777-888888888888", "volumes", csiVolumesDir, "v", "mount")
		unpublish(t, e, "v", never)
		unpublish(t, e, "v", never)
		// Present but not mounted.
		plain := e.target(t, testPodUID, "plain")
		if err := os.Mkdir(plain, 0o750); err != nil {
			t.Fatal(err)
		}
		unpublish(t, e, "v", plain)
		if _, err := os.Lstat(plain); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("unmounted target not removed: %v", err)
		}
	})
}

func TestUnpublishRemovesEveryLayer(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		publish(t, e, publishReq(testPodUID, target))
		// Someone stacked more on top: a bind of ours and a tmpfs.
		e.bindSocketDir(t, target, false)
		e.mountTmpfs(t, target)
		if n := len(e.mountsAt(t, target)); n != 3 {
			t.Fatalf("setup: %d layers", n)
		}
		unpublish(t, e, "csi-"+testPodUID, target)
		if got := e.mountsUnder(t, e.root); len(got) != 0 {
			t.Fatalf("mounts left: %v", got)
		}
		if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("target left: %v", err)
		}
	})
}

// decodeCondition reads the pre-1.13 VolumeCondition (field 2) off the wire.
func decodeCondition(t *testing.T, resp *csipb.NodeGetVolumeStatsResponse) (found, abnormal bool, message string) {
	t.Helper()
	b, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatal(protowire.ParseError(n))
		}
		b = b[n:]
		if num != statsConditionField || typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				t.Fatal(protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		cond, n := protowire.ConsumeBytes(b)
		if n < 0 {
			t.Fatal(protowire.ParseError(n))
		}
		b = b[n:]
		found = true
		for len(cond) > 0 {
			fnum, ftyp, m := protowire.ConsumeTag(cond)
			cond = cond[m:]
			switch {
			case fnum == conditionAbnormalField && ftyp == protowire.VarintType:
				v, m := protowire.ConsumeVarint(cond)
				abnormal, cond = v != 0, cond[m:]
			case fnum == conditionMessageField && ftyp == protowire.BytesType:
				s, m := protowire.ConsumeString(cond)
				message, cond = s, cond[m:]
			default:
				t.Fatalf("unexpected field %d in the condition", fnum)
			}
		}
	}
	return found, abnormal, message
}

func TestVolumeStatsCondition(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		volID := "csi-" + testPodUID
		publish(t, e, publishReq(testPodUID, target))
		stats := func() *csipb.NodeGetVolumeStatsResponse {
			t.Helper()
			resp, err := e.node.NodeGetVolumeStats(context.Background(), &csipb.NodeGetVolumeStatsRequest{VolumeId: volID, VolumePath: target})
			if err != nil {
				t.Fatal(err)
			}
			return resp
		}
		health := func() *csipb.VolumeHealth {
			t.Helper()
			resp, err := e.node.NodeGetVolumeHealth(context.Background(), &csipb.NodeGetVolumeHealthRequest{VolumeId: volID})
			if err != nil {
				t.Fatal(err)
			}
			return resp.GetVolumeHealth()
		}

		resp := stats()
		if found, abnormal, msg := decodeCondition(t, resp); !found || abnormal || msg == "" {
			t.Fatalf("healthy volume: condition found=%v abnormal=%v %q", found, abnormal, msg)
		}
		if len(resp.GetUsage()) != 2 || resp.GetUsage()[0].GetTotal() <= 0 {
			t.Fatalf("usage %+v", resp.GetUsage())
		}
		if h := health(); len(h.GetHealthStatuses()) != 0 || h.GetVolumeId() != volID {
			t.Fatalf("healthy volume health %+v", h)
		}

		// Someone else's mount on top.
		e.mountTmpfs(t, target)
		if _, abnormal, msg := decodeCondition(t, stats()); !abnormal || !strings.Contains(msg, "not from the Workload API socket directory") {
			t.Fatalf("foreign mount: abnormal=%v %q", abnormal, msg)
		}
		if h := health(); len(h.GetHealthStatuses()) != 1 || h.GetHealthStatuses()[0].GetReason() != "ForeignMount" {
			t.Fatalf("foreign mount health %+v", h)
		}
		e.unmountUnder(t, target)
		if _, abnormal, msg := decodeCondition(t, stats()); !abnormal || !strings.Contains(msg, "not mounted") {
			t.Fatalf("unmounted: abnormal=%v %q", abnormal, msg)
		}

		// The socket directory gone.
		if err := os.RemoveAll(e.socketDir); err != nil {
			t.Fatal(err)
		}
		if _, abnormal, msg := decodeCondition(t, stats()); !abnormal || !strings.Contains(msg, "is gone") {
			t.Fatalf("socket dir gone: abnormal=%v %q", abnormal, msg)
		}
		if h := health(); len(h.GetHealthStatuses()) != 1 || h.GetHealthStatuses()[0].GetReason() != "SocketDirGone" {
			t.Fatalf("socket dir gone health %+v", h)
		}

		// Unknown volume or path: NotFound; missing fields: InvalidArgument.
		_, err := e.node.NodeGetVolumeStats(context.Background(), &csipb.NodeGetVolumeStatsRequest{VolumeId: "other", VolumePath: target})
		wantCode(t, err, codes.NotFound)
		_, err = e.node.NodeGetVolumeStats(context.Background(), &csipb.NodeGetVolumeStatsRequest{VolumeId: volID, VolumePath: "/elsewhere"})
		wantCode(t, err, codes.NotFound)
		_, err = e.node.NodeGetVolumeStats(context.Background(), &csipb.NodeGetVolumeStatsRequest{VolumePath: target})
		wantCode(t, err, codes.InvalidArgument, "volume_id")
		_, err = e.node.NodeGetVolumeStats(context.Background(), &csipb.NodeGetVolumeStatsRequest{VolumeId: volID})
		wantCode(t, err, codes.InvalidArgument, "volume_path")
	})
}

func TestReconcile(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		pod := func(i int) string { return strings.Repeat(string(rune('a'+i)), 8) + "-0000-0000-0000-000000000000" }

		kept := e.target(t, pod(0), "spiffe")
		publish(t, e, publishReq(pod(0), kept))

		gone := e.target(t, pod(1), "spiffe")
		publish(t, e, publishReq(pod(1), gone))
		e.unmountTop(t, gone) // the mount vanished (reboot)

		orphan := e.target(t, pod(2), "spiffe") // mounted, never recorded (crash)
		if err := os.Mkdir(orphan, 0o750); err != nil {
			t.Fatal(err)
		}
		e.bindSocketDir(t, orphan, true)

		foreign := e.target(t, pod(3), "other-driver") // not ours: left alone
		if err := os.Mkdir(foreign, 0o750); err != nil {
			t.Fatal(err)
		}
		e.mountTmpfs(t, foreign)

		// A kubelet subPath bind of the socket dir: not a CSI target, left alone.
		subpath := filepath.Join(e.kubeletRoot, "pods", pod(5), "volume-subpaths", "spiffe", "app", "0")
		if err := os.MkdirAll(subpath, 0o750); err != nil {
			t.Fatal(err)
		}
		e.bindSocketDir(t, subpath, true)

		writable := e.target(t, pod(4), "spiffe") // recorded, but the mount is writable
		publish(t, e, publishReq(pod(4), writable))
		e.remountWritable(t, writable)

		e.openDriver(t)
		res, err := e.d.reconcile(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if res.Kept != 2 || len(res.Dropped) != 1 || res.Dropped[0] != gone ||
			len(res.Orphans) != 1 || res.Orphans[0] != orphan || len(res.Repaired) != 1 || res.Repaired[0] != writable {
			t.Fatalf("reconcile result %+v", res)
		}
		for _, tc := range []struct {
			target  string
			mounts  int
			records int
		}{{kept, 1, 1}, {gone, 0, 0}, {orphan, 0, 0}, {foreign, 1, 0}, {subpath, 1, 0}, {writable, 1, 1}} {
			if got := len(e.mountsAt(t, tc.target)); got != tc.mounts {
				t.Errorf("%s: %d mounts, want %d", tc.target, got, tc.mounts)
			}
			_, ok := e.store.ByTarget(tc.target)
			if ok != (tc.records == 1) {
				t.Errorf("%s: record present=%v", tc.target, ok)
			}
		}
		if ms := e.mountsAt(t, writable); len(ms) == 1 && !hasOpts(ms[0], requiredOpts) {
			t.Errorf("repaired mount options %q", ms[0].Options)
		}
		// Reconcile is idempotent.
		res, err = e.d.reconcile(context.Background())
		if err != nil || res.Kept != 2 || len(res.Dropped)+len(res.Orphans)+len(res.Repaired) != 0 {
			t.Fatalf("second reconcile %+v, %v", res, err)
		}
		if err := e.d.Reconcile(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
}

func TestReconcileNeedsSocketDir(t *testing.T) {
	e := newEnv(t)
	if err := os.Remove(e.socketDir); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Reconcile(context.Background()); err == nil {
		t.Fatal("reconcile without the socket directory succeeded")
	}
}

// The agent recreated its socket directory: published targets still show the
// deleted one, and the pods behind them can no longer reach the Workload API.
func TestStaleMountAfterSocketDirRecreated(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		req := publishReq(testPodUID, target)
		publish(t, e, req)
		if err := os.Remove(e.socketDir); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(e.socketDir, 0o755); err != nil {
			t.Fatal(err)
		}
		resp, err := e.node.NodeGetVolumeHealth(context.Background(), &csipb.NodeGetVolumeHealthRequest{VolumeId: req.VolumeId})
		if err != nil {
			t.Fatal(err)
		}
		if hs := resp.GetVolumeHealth().GetHealthStatuses(); len(hs) != 1 || hs[0].GetReason() != "MountBroken" || !strings.Contains(hs[0].GetMessage(), "was deleted") {
			t.Fatalf("health of a stale mount: %+v", hs)
		}
		// The kubelet's retry replaces the stale mount rather than stacking on it.
		publish(t, e, req)
		if ms := e.mountsAt(t, target); len(ms) != 1 || strings.HasSuffix(ms[0].Root, "//deleted") {
			t.Fatalf("after republishing: %+v", ms)
		}
		resp, err = e.node.NodeGetVolumeHealth(context.Background(), &csipb.NodeGetVolumeHealthRequest{VolumeId: req.VolumeId})
		if err != nil || len(resp.GetVolumeHealth().GetHealthStatuses()) != 0 {
			t.Fatalf("health after republishing: %+v, %v", resp, err)
		}
	})
}
