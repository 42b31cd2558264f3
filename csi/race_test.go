package csi

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// A symlink swapped into the target path (renameat2 RENAME_EXCHANGE) while
// publish runs must never send the mount out of the kubelet root: every
// publish either mounts at the target or fails and leaves nothing.
func TestPublishRacingSymlinkSwap(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name string
		// swapped is the target's component that is exchanged with a
		// symlink next to it, relative to the pod's CSI volumes dir.
		swapped string
	}{
		{"volume dir", "spiffe"},
		{"target dir", "spiffe/mount"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			outside := filepath.Join(e.root, "outside")
			if err := os.MkdirAll(filepath.Join(outside, "mount"), 0o755); err != nil {
				t.Fatal(err)
			}
			target := e.target(t, testPodUID, "spiffe")
			if err := os.Mkdir(target, 0o750); err != nil {
				t.Fatal(err)
			}
			real := filepath.Join(filepath.Dir(filepath.Dir(target)), tc.swapped)
			link := filepath.Join(filepath.Dir(real), "evil")
			linkTo := outside
			if tc.swapped == "spiffe/mount" {
				linkTo = filepath.Join(outside, "mount")
			}
			if err := os.Symlink(linkTo, link); err != nil {
				t.Fatal(err)
			}
			swap := func() error { return unix.Renameat2(unix.AT_FDCWD, real, unix.AT_FDCWD, link, unix.RENAME_EXCHANGE) }
			restore := func(perr error) {
				if fi, err := os.Lstat(real); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
					if err := swap(); err != nil {
						t.Fatalf("restore %s: %v (mounts %v, publish: %v)", real, err, mountsUnder(t, e.root), perr)
					}
				}
			}
			outsideMounts := func() []string {
				var out []string
				for _, mp := range mountsUnder(t, e.root) {
					if !isUnder(mp, e.kubeletRoot) {
						out = append(out, mp)
					}
				}
				return out
			}

			req := publishReq(testPodUID, target)
			var swaps, ok, refused int64
			deadline := time.Now().Add(2 * time.Second)
			for i := 0; i < 300 && time.Now().Before(deadline); i++ {
				stop := make(chan struct{})
				var wg sync.WaitGroup
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						// A mount point cannot be renamed (EBUSY): once a
						// mount is on the target dir, it stays where it is.
						if err := swap(); err != nil && !errors.Is(err, unix.EBUSY) {
							t.Error(err)
							return
						} else if err == nil {
							atomic.AddInt64(&swaps, 1)
						}
					}
				}()
				_, err := e.node.NodePublishVolume(context.Background(), req)
				close(stop)
				wg.Wait()
				if got := outsideMounts(); len(got) > 0 {
					t.Fatalf("iteration %d: publish (err %v) mounted outside the kubelet root: %v", i, err, got)
				}
				restore(err)
				if err != nil {
					if c := status.Code(err); c != codes.InvalidArgument && c != codes.Internal {
						t.Fatalf("iteration %d: publish failed with %v", i, err)
					}
					refused++
					if got := mountsUnder(t, e.root); len(got) != 0 {
						t.Fatalf("iteration %d: a refused publish left mounts: %v (%v)", i, got, err)
					}
					if _, recorded := e.store.ByTarget(target); recorded {
						t.Fatalf("iteration %d: a refused publish was recorded", i)
					}
					continue
				}
				ok++
				if ms := mountsAt(t, target); len(ms) != 1 {
					t.Fatalf("iteration %d: publish succeeded, %d mounts at the target", i, len(ms))
				}
				if _, err := e.node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: target}); err != nil {
					t.Fatalf("iteration %d: unpublish: %v", i, err)
				}
				if got := mountsUnder(t, e.root); len(got) != 0 {
					t.Fatalf("iteration %d: mounts after unpublish: %v", i, got)
				}
				if err := os.Mkdir(target, 0o750); err != nil && !errors.Is(err, fs.ErrExist) {
					t.Fatal(err)
				}
			}
			t.Logf("%d swaps, %d publishes succeeded, %d refused", swaps, ok, refused)
			if ok == 0 || refused == 0 {
				t.Errorf("the race was not exercised: %d succeeded, %d refused", ok, refused)
			}
			if entries, _ := os.ReadDir(filepath.Join(outside, "mount")); len(entries) != 0 {
				t.Errorf("something was created outside: %v", entries)
			}
		})
	}
}
