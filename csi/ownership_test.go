package csi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// Unpublish takes away only what publish gave: not a mount a refused
// publish found, not a target recorded for another volume.
func TestUnpublishLeavesWhatIsNotOurs(t *testing.T) {
	forEachBackend(t, func(t *testing.T, e *env) {
		// Another driver's mount, which publish refused to stack on.
		foreign := e.target(t, testPodUID, "spiffe")
		if err := os.Mkdir(foreign, 0o750); err != nil {
			t.Fatal(err)
		}
		e.mountTmpfs(t, foreign)
		_, err := e.node.NodePublishVolume(context.Background(), publishReq(testPodUID, foreign))
		wantCode(t, err, codes.FailedPrecondition)
		_, err = e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "csi-" + testPodUID, TargetPath: foreign})
		wantCode(t, err, codes.FailedPrecondition, "not the driver's")
		if ms := e.mountsAt(t, foreign); len(ms) != 1 || ms[0].FSType != "tmpfs" {
			t.Fatalf("the foreign mount was touched: %+v", ms)
		}

		// A neighbour's published target, named with another volume ID.
		pod2 := "22222222-3333-4444-5555-666666666666"
		neighbour := e.target(t, pod2, "spiffe")
		req := publishReq(pod2, neighbour)
		publish(t, e, req)
		_, err = e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: "csi-other", TargetPath: neighbour})
		wantCode(t, err, codes.NotFound, "holds volume "+req.VolumeId)
		if ms := e.mountsAt(t, neighbour); len(ms) != 1 {
			t.Fatalf("%d mounts at the neighbour's target, want 1", len(ms))
		}
		if _, ok := e.store.ByTarget(neighbour); !ok {
			t.Fatal("the neighbour's record was dropped")
		}
		// Its own volume ID unpublishes it.
		unpublish(t, e, req.VolumeId, neighbour)
		if ms := e.mountsAt(t, neighbour); len(ms) != 0 {
			t.Fatalf("%d mounts left after the real unpublish", len(ms))
		}

		// A mount of ours without a record (the orphan of a crash, or a
		// record lost to a damaged journal) goes when the kubelet asks:
		// refusing would leave the pod stuck terminating.
		orphan := e.target(t, pod2, "orphan")
		if err := os.Mkdir(orphan, 0o750); err != nil {
			t.Fatal(err)
		}
		e.bindSocketDir(t, orphan, true)
		unpublish(t, e, "csi-orphan", orphan)
		if ms := e.mountsAt(t, orphan); len(ms) != 0 {
			t.Fatalf("%d mounts left at the orphan", len(ms))
		}
	})
}

// A publish that fails after it made directories removes them, and only
// them.
func TestRefusedPublishLeavesNoDirectories(t *testing.T) {
	check := func(t *testing.T, e *env, fail func()) {
		pods := filepath.Join(e.kubeletRoot, "pods")
		if err := os.Mkdir(pods, 0o750); err != nil {
			t.Fatal(err)
		}
		// Someone else's file in the pods dir stays.
		if err := os.WriteFile(filepath.Join(pods, "keep"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		target := filepath.Join(pods, testPodUID, "volumes", csiVolumesDir, "spiffe", "mount")
		fail()
		if _, err := e.node.NodePublishVolume(context.Background(), publishReq(testPodUID, target)); err == nil {
			t.Fatal("publish succeeded")
		}
		if _, err := os.Lstat(filepath.Join(pods, testPodUID)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the directories a refused publish made are left: %v", err)
		}
		if _, err := os.Stat(filepath.Join(pods, "keep")); err != nil {
			t.Errorf("a file the driver did not make is gone: %v", err)
		}
		if got := e.mountsUnder(t, e.root); len(got) != 0 {
			t.Errorf("mounts left: %v", got)
		}
	}
	t.Run("record fails", func(t *testing.T) {
		forEachBackend(t, func(t *testing.T, e *env) { check(t, e, e.closeStore) })
	})
	t.Run("mount fails", func(t *testing.T) {
		e := newFakeEnv(t)
		check(t, e, func() { e.fake.bindErr = errors.New("injected mount failure") })
	})
}

// A complete journal line that does not parse must not cost a pod its
// mount: the store is damaged, and Reconcile keeps mounts without records.
func TestReconcileKeepsMountsWhenRecordsAreDamaged(t *testing.T) {
	for _, where := range []string{"middle line", "last line"} {
		t.Run(where, func(t *testing.T) { testReconcileKeepsMounts(t, where == "last line") })
	}
}

func testReconcileKeepsMounts(t *testing.T, last bool) {
	forEachBackend(t, func(t *testing.T, e *env) {
		target := e.target(t, testPodUID, "spiffe")
		pod2 := "22222222-3333-4444-5555-666666666666"
		other := e.target(t, pod2, "spiffe")
		if last {
			publish(t, e, publishReq(pod2, other))
		}
		publish(t, e, publishReq(testPodUID, target))
		if !last {
			publish(t, e, publishReq(pod2, other))
		}
		e.closeStore()

		// Damage the first pod's line, newline kept (it was acknowledged).
		journal := filepath.Join(e.stateDir, "records.log")
		data, err := os.ReadFile(journal)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.SplitAfter(string(data), "\n")
		damaged := false
		for i, l := range lines {
			if strings.Contains(l, testPodUID) {
				lines[i] = strings.Repeat("\x00", len(l)-1) + "\n"
				damaged = true
			}
		}
		if !damaged {
			t.Fatalf("no line of pod %s in %q", testPodUID, data)
		}
		if err := os.WriteFile(journal, []byte(strings.Join(lines, "")), 0o600); err != nil {
			t.Fatal(err)
		}

		e.openDriver(t)
		if len(e.store.Quarantined()) != 1 {
			t.Fatalf("quarantined %v", e.store.Quarantined())
		}
		res, err := e.d.reconcile(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Orphans) != 0 || len(res.Unrecorded) != 1 || res.Unrecorded[0] != target || res.Kept != 1 {
			t.Fatalf("reconcile result %+v", res)
		}
		for _, tg := range []string{target, other} {
			if ms := e.mountsAt(t, tg); len(ms) != 1 {
				t.Errorf("%s: %d mounts, want 1", tg, len(ms))
			}
		}
		// The kubelet's retry records it again.
		publish(t, e, publishReq(testPodUID, target))
		if _, ok := e.store.ByTarget(target); !ok {
			t.Fatal("republish did not record the target")
		}
		// A healthy store still cleans orphans: the operator removed the copy.
		for _, q := range e.store.Quarantined() {
			if err := os.Remove(q); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.store.Delete(target); err != nil {
			t.Fatal(err)
		}
		e.openDriver(t)
		res, err = e.d.reconcile(context.Background())
		if err != nil || len(res.Orphans) != 1 || res.Orphans[0] != target {
			t.Fatalf("reconcile of a healthy store: %+v, %v", res, err)
		}
	})
}

func TestOpenDirAt(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	for _, d := range []string{"a/b/c"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(outside, filepath.Join(root, "a", "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("b", filepath.Join(root, "a", "rel")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "a", "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rootFd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rootFd)
	for name, open := range map[string]func(int, string) (int, error){"openat2": openDirAt, "openat fallback": openDirNoFollow} {
		for _, tc := range []struct {
			path string
			want error
		}{
			{"a/b/c", nil},
			{"a", nil},
			{"a/link", unix.ELOOP},
			{"a/link/x", unix.ELOOP},
			{"a/rel/c", unix.ELOOP},
			{"a/file", unix.ENOTDIR},
			{"a/missing/c", unix.ENOENT},
		} {
			t.Run(name+" "+tc.path, func(t *testing.T) {
				fd, err := open(rootFd, tc.path)
				if fd >= 0 && err == nil {
					defer unix.Close(fd)
				}
				if !errors.Is(err, tc.want) && !(tc.want == nil && err == nil) {
					t.Fatalf("got %v, want %v", err, tc.want)
				}
				if tc.want != nil {
					return
				}
				got, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
				if err != nil || got != filepath.Join(root, tc.path) {
					t.Fatalf("opened %q, %v", got, err)
				}
			})
		}
	}
}
