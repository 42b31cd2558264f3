package csi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

const bindChildEnv = "CSI_TEST_BIND_CHILD"

// runBindChild publishes the way the agent does from inside its container:
// in its own mount namespace whose kubelet dir is a peer of the host's.
func runBindChild() int {
	flags, _ := asBind(bindOptions)
	bind := bindMountPath
	if os.Getenv("BIND_FALLBACK") == "1" {
		bind = func(source, target string, flags uintptr) error {
			f, err := os.OpenFile(target, unix.O_PATH|unix.O_DIRECTORY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			return bindFromReadOnlyCopy(source, f, flags)
		}
	}
	if err := bind(os.Getenv("BIND_SOURCE"), os.Getenv("BIND_TARGET"), flags); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// TestPublishedMountReadOnlyOnTheHost: the agent runs in a container whose
// kubelet dir has Bidirectional propagation. The mount it creates must be
// read-only (and nosuid, nodev, noexec) where the kubelet and the pod's
// container runtime see it, on the host, not just in the agent's namespace.
func TestPublishedMountReadOnlyOnTheHost(t *testing.T) {
	testutil.RequireRoot(t)
	t.Run("detached mount", func(t *testing.T) { testReadOnlyOnHost(t, false) })
	t.Run("older kernels: read-only copy", func(t *testing.T) { testReadOnlyOnHost(t, true) })
}

func testReadOnlyOnHost(t *testing.T, fallback bool) {
	root := t.TempDir()
	kubelet := filepath.Join(root, "kubelet")
	src := filepath.Join(root, "sockets")
	target := filepath.Join(kubelet, "pods", "uid", "volumes", "kubernetes.io~csi", "v", "mount")
	for _, d := range []string{src, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The kubelet dir as a shared mount, as on a node.
	if err := unix.Mount(kubelet, kubelet, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(kubelet, unix.MNT_DETACH) })
	if err := unix.Mount("", kubelet, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}

	// The "container": a new mount namespace keeping the propagation, so the
	// kubelet dir in it is a peer of the host's (Bidirectional).
	cmd := exec.Command("unshare", "--mount", "--propagation", "unchanged", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), bindChildEnv+"=1", "BIND_SOURCE="+src, "BIND_TARGET="+target, "BIND_FALLBACK="+map[bool]string{true: "1", false: "0"}[fallback])
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("publish in the container namespace: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })

	ms := mountsAt(t, target)
	if len(ms) != 1 {
		t.Fatalf("%d mounts at the target on the host, want 1", len(ms))
	}
	if !hasOpts(ms[0], requiredOpts) {
		t.Fatalf("on the host the target has options %q, want %s", ms[0].Options, strings.Join(requiredOpts, ","))
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("write through the target on the host: %v", err)
	}
	// No scratch copy is left mounted.
	if data, err := os.ReadFile("/proc/self/mountinfo"); err != nil || strings.Contains(string(data), "csi-agent-ro-") {
		t.Fatalf("scratch mount left behind (%v)", err)
	}
}
