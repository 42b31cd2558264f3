package csi

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

// The restart tests run the driver in a child process (this test binary,
// re-executed with childEnv set) so that a SIGKILL is a real crash.
const (
	childEnv         = "CSI_AGENT_TEST_CHILD_DRIVER"
	childKubeletRoot = "CSI_AGENT_TEST_KUBELET_ROOT"
	childSocketDir   = "CSI_AGENT_TEST_SOCKET_DIR"
	childStateDir    = "CSI_AGENT_TEST_STATE_DIR"
	childCSISocket   = "CSI_AGENT_TEST_CSI_SOCKET"
	childPause       = "CSI_AGENT_TEST_PAUSE" // after-mount | after-record
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(runChildDriver())
	}
	if os.Getenv(bindChildEnv) == "1" {
		os.Exit(runBindChild())
	}
	os.Exit(m.Run())
}

// runChildDriver is the agent as the restart tests run it: open the records,
// reconcile, serve. It reports on stdout, one line per event.
func runChildDriver() int {
	store, err := records.Open(os.Getenv(childStateDir))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	d, err := New(Options{
		DriverName:           config.DefaultDriverName,
		Version:              "test",
		NodeID:               "node-1",
		KubeletRootDir:       os.Getenv(childKubeletRoot),
		WorkloadAPISocketDir: os.Getenv(childSocketDir),
		Records:              store,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	pause := func(stage string) func(string) {
		return func(target string) {
			fmt.Printf("PAUSED %s %s\n", stage, target)
			select {} // until SIGKILL
		}
	}
	switch os.Getenv(childPause) {
	case "after-mount":
		d.hooks.afterMount = pause("after-mount")
	case "after-record":
		d.hooks.afterRecord = pause("after-record")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	res, err := d.reconcile(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "reconcile:", err)
		return 2
	}
	out, _ := json.Marshal(res)
	fmt.Printf("RECONCILED %s\n", out)
	if err := d.Serve(ctx, os.Getenv(childCSISocket)); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		return 2
	}
	return 0
}

type childDriver struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr *testutil.LockedBuffer
	done   chan struct{}
}

func startChild(t *testing.T, e *env, socket, pause string) *childDriver {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(),
		childEnv+"=1",
		childKubeletRoot+"="+e.kubeletRoot,
		childSocketDir+"="+e.socketDir,
		childStateDir+"="+e.stateDir,
		childCSISocket+"="+socket,
		childPause+"="+pause,
	)
	c := &childDriver{cmd: cmd, lines: make(chan string, 16), stderr: &testutil.LockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = c.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	go func() {
		_ = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			t.Logf("child driver stderr:\n%s", c.stderr.String())
		}
	})
	return c
}

// waitLine returns the rest of the next stdout line starting with prefix.
func (c *childDriver) waitLine(t *testing.T, prefix string) string {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case line, ok := <-c.lines:
			if !ok {
				t.Fatalf("child exited before %q; stderr:\n%s", prefix, c.stderr.String())
			}
			if rest, found := strings.CutPrefix(line, prefix); found {
				return strings.TrimSpace(rest)
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %q; stderr:\n%s", prefix, c.stderr.String())
		}
	}
}

func (c *childDriver) kill() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// waitServing waits until the child answers on socket.
func waitServing(t *testing.T, socket string) csipb.NodeClient {
	t.Helper()
	conn := dial(t, socket)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := csipb.NewIdentityClient(conn).GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("child not serving on %s: %v", socket, err)
	}
	return csipb.NewNodeClient(conn)
}

// agreement checks that the records on disk and the mounts under the pods
// directory name the same targets, each one read-only bind of the socket dir.
func agreement(t *testing.T, e *env) []string {
	t.Helper()
	all, err := records.Load(e.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var recorded []string
	for _, r := range all {
		recorded = append(recorded, r.TargetPath)
	}
	sort.Strings(recorded)
	mounted := mountsUnder(t, filepath.Join(e.kubeletRoot, "pods"))
	if strings.Join(recorded, "\n") != strings.Join(mounted, "\n") {
		t.Fatalf("records and mounts disagree:\nrecords: %v\nmounts:  %v", recorded, mounted)
	}
	for _, m := range mounted {
		ms := mountsAt(t, m)
		if len(ms) != 1 || !hasOpts(ms[0], requiredOpts) {
			t.Fatalf("%s: %d layers, options %q", m, len(ms), ms[0].Options)
		}
	}
	return recorded
}

func TestRestartAfterKill(t *testing.T) {
	testutil.RequireRoot(t)
	tests := []struct {
		name        string
		pause       string
		wantKept    bool // the publish survives the restart
		wantOrphans int
	}{
		{"killed right after the answer", "", true, 0},
		{"killed between mount and record", "after-mount", false, 1},
		{"killed between record and answer", "after-record", true, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.closeStore() // the child process owns the records
			socket := filepath.Join(e.root, "csi.sock")
			target := e.target(t, testPodUID, "spiffe")
			other := e.target(t, testPodUID, "second")
			req := publishReq(testPodUID, target)

			// A publish that completes before the crash, and one the crash hits.
			c := startChild(t, e, socket, tc.pause)
			c.waitLine(t, "RECONCILED")
			node := waitServing(t, socket)
			if tc.pause == "" {
				if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
					t.Fatal(err)
				}
				c.kill()
			} else {
				errc := make(chan error, 1)
				go func() {
					_, err := node.NodePublishVolume(context.Background(), req)
					errc <- err
				}()
				if got := c.waitLine(t, "PAUSED "+tc.pause); got != target {
					t.Fatalf("paused on %q", got)
				}
				// The crash lands exactly here.
				if n := len(mountsAt(t, target)); n != 1 {
					t.Fatalf("%d mounts at the pause", n)
				}
				onDisk, err := records.Load(e.stateDir)
				if err != nil {
					t.Fatal(err)
				}
				if ok := hasTarget(onDisk, target); ok != (tc.pause == "after-record") {
					t.Fatalf("record on disk at %s: %v", tc.pause, ok)
				}
				c.kill()
				if err := <-errc; err == nil {
					t.Fatal("publish answered although the driver was killed")
				}
			}

			// Restart: reconcile, then serve.
			c = startChild(t, e, socket, "")
			var res reconcileResult
			if err := json.Unmarshal([]byte(c.waitLine(t, "RECONCILED")), &res); err != nil {
				t.Fatal(err)
			}
			if len(res.Orphans) != tc.wantOrphans || len(res.Dropped) != 0 {
				t.Fatalf("reconcile after the crash: %+v", res)
			}
			got := agreement(t, e)
			if kept := len(got) == 1 && got[0] == target; kept != tc.wantKept {
				t.Fatalf("after restart the publish is kept=%v, want %v (%v)", kept, tc.wantKept, got)
			}

			// The kubelet retries; then new publishes and unpublishes work.
			node = waitServing(t, socket)
			for _, r := range []*csipb.NodePublishVolumeRequest{req, req, publishReq(testPodUID, other)} {
				if _, err := node.NodePublishVolume(context.Background(), r); err != nil {
					t.Fatalf("publish %s after restart: %v", r.TargetPath, err)
				}
			}
			if got := agreement(t, e); len(got) != 2 {
				t.Fatalf("after republishing: %v", got)
			}
			for _, tg := range []string{target, other} {
				if _, err := node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: tg}); err != nil {
					t.Fatalf("unpublish %s: %v", tg, err)
				}
			}
			if got := agreement(t, e); len(got) != 0 {
				t.Fatalf("after unpublishing: %v", got)
			}

			// A reboot: the record of a publish survives, its mount does not.
			if _, err := node.NodePublishVolume(context.Background(), req); err != nil {
				t.Fatal(err)
			}
			c.kill()
			cleanupMounts(t, filepath.Join(e.kubeletRoot, "pods"))
			c = startChild(t, e, socket, "")
			if err := json.Unmarshal([]byte(c.waitLine(t, "RECONCILED")), &res); err != nil {
				t.Fatal(err)
			}
			if len(res.Dropped) != 1 || res.Dropped[0] != target {
				t.Fatalf("reconcile after the reboot: %+v", res)
			}
			agreement(t, e)
		})
	}
}

func hasTarget(rs []records.Record, target string) bool {
	for _, r := range rs {
		if r.TargetPath == target {
			return true
		}
	}
	return false
}
