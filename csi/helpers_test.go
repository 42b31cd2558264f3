package csi

import (
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/csi-agent/csi-agent/internal/records"
)

const (
	testPodUID  = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
	testPodNS   = "payments"
	testPodName = "api-7d9f8-xk2lp"
	testSA      = "api"
)

// env is a temporary kubelet root, socket dir and state dir with a Driver.
type env struct {
	root        string
	kubeletRoot string
	socketDir   string
	stateDir    string
	store       *records.Store
	d           *Driver
	node        nodeServer
}

func newEnv(t testing.TB) *env {
	return newEnvWithMounter(t, nil)
}

func newEnvWithMounter(t testing.TB, m mount.Interface) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{
		root:        root,
		kubeletRoot: filepath.Join(root, "kubelet"),
		socketDir:   filepath.Join(root, "spire-agent"),
		stateDir:    filepath.Join(root, "state"),
	}
	// Registered after TempDir, so it runs before the directory is removed.
	t.Cleanup(func() { cleanupMounts(t, root) })
	for _, dir := range []string{e.kubeletRoot, e.socketDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.openDriver(t, m)
	return e
}

// openDriver opens the store and a Driver afresh, as a restarted agent does.
func (e *env) openDriver(t testing.TB, m mount.Interface) {
	t.Helper()
	// The store is single-process: the "crashed" agent's handle goes first.
	e.closeStore()
	store, err := records.Open(e.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	d, err := New(Options{
		NodeID:               "node-1",
		KubeletRootDir:       e.kubeletRoot,
		WorkloadAPISocketDir: e.socketDir,
		Records:              store,
		Mounter:              m,
	})
	if err != nil {
		t.Fatal(err)
	}
	e.store, e.d, e.node = store, d, nodeServer{d: d}
}

// target returns a kubelet-style target for the pod and volume, with the
// parent directory the kubelet creates.
func (e *env) target(t testing.TB, podUID, volume string) string {
	t.Helper()
	dir := filepath.Join(e.kubeletRoot, "pods", podUID, "volumes", csiVolumesDir, volume)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "mount")
}

func publishReq(podUID, target string) *csipb.NodePublishVolumeRequest {
	return &csipb.NodePublishVolumeRequest{
		VolumeId:   "csi-" + podUID,
		TargetPath: target,
		VolumeCapability: &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly: true,
		VolumeContext: map[string]string{
			ctxEphemeral:      "true",
			ctxPodUID:         podUID,
			ctxPodNamespace:   testPodNS,
			ctxPodName:        testPodName,
			ctxServiceAccount: testSA,
		},
	}
}

// mountsAt returns every mount table entry at path (stacked layers too).
func mountsAt(t testing.TB, path string) []*mountinfo.Info {
	t.Helper()
	ms, err := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) { return m.Mountpoint != path, false })
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// mountsUnder returns the mount points at or below dir.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.Mountpoint)
	}
	sort.Strings(out)
	return out
}

// cleanupMounts unmounts everything below dir, deepest first, lazily as a
// last resort, so that a failing test never leaves mounts behind.
func cleanupMounts(t testing.TB, dir string) {
	for round := 0; round < 16; round++ {
		ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		if err != nil || len(ms) == 0 {
			return
		}
		sort.Slice(ms, func(i, j int) bool { return len(ms[i].Mountpoint) > len(ms[j].Mountpoint) })
		for _, m := range ms {
			flags := unix.UMOUNT_NOFOLLOW
			if round > 2 {
				flags |= unix.MNT_DETACH
			}
			if err := unix.Unmount(m.Mountpoint, flags); err != nil && round > 2 {
				t.Logf("cleanup: unmount %s: %v", m.Mountpoint, err)
			}
		}
	}
}

func wantCode(t testing.TB, err error, code codes.Code, msgContains ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v (code %v), want code %v", err, status.Code(err), code)
	}
	for _, s := range msgContains {
		if !strings.Contains(status.Convert(err).Message(), s) {
			t.Errorf("message %q does not contain %q", status.Convert(err).Message(), s)
		}
	}
}

func isErrno(err error, errno unix.Errno) bool { return errors.Is(err, errno) }

// closeStore releases the env's records store, as a process exit would.
func (e *env) closeStore() {
	if e.store != nil {
		e.store.Close()
		e.store = nil
	}
}
