package k8s

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"github.com/csi-agent/csi-agent/attestor/field"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

// cgroupSandbox places real processes in kubepods paths at the root of every
// writable cgroup hierarchy of the host (a v1 controller and the v2 tree,
// whichever exist), where a kubelet puts pods: the attestor only accepts
// pods there. It creates only missing directories and removes exactly those.
type cgroupSandbox struct {
	t       *testing.T
	v1      string // e.g. /sys/fs/cgroup/pids, "" when absent
	v2      string // e.g. /sys/fs/cgroup/unified, "" when absent
	roots   []string
	created []string // in creation order
}

func newCgroupSandbox(t *testing.T) *cgroupSandbox {
	t.Helper()
	s := &cgroupSandbox{t: t}
	s.v2 = findHierarchy(unix.CGROUP2_SUPER_MAGIC, "/sys/fs/cgroup", "/sys/fs/cgroup/unified")
	s.v1 = findHierarchy(unix.CGROUP_SUPER_MAGIC, "/sys/fs/cgroup/pids", "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/cpu")
	for _, r := range []string{s.v1, s.v2} {
		if r != "" {
			s.roots = append(s.roots, r)
		}
	}
	if len(s.roots) == 0 {
		t.Fatal("no cgroup hierarchy found under /sys/fs/cgroup")
	}
	t.Cleanup(func() {
		for i := len(s.created) - 1; i >= 0; i-- {
			if err := removeCgroupTree(s.created[i]); err != nil {
				t.Errorf("remove test cgroup %s: %v", s.created[i], err)
			}
		}
	})
	return s
}

// mkdir creates the missing directories of dir below root, remembering them.
func (s *cgroupSandbox) mkdir(root, rel string) string {
	s.t.Helper()
	dir := root
	for _, part := range strings.Split(rel, "/") {
		dir = filepath.Join(dir, part)
		if _, err := os.Stat(dir); err == nil {
			continue
		}
		if err := os.Mkdir(dir, 0o755); err != nil {
			s.t.Fatal(err)
		}
		s.created = append(s.created, dir)
	}
	return dir
}

func findHierarchy(magic int64, candidates ...string) string {
	for _, c := range candidates {
		var st unix.Statfs_t
		if err := unix.Statfs(c, &st); err == nil && int64(st.Type) == magic {
			return c
		}
	}
	return ""
}

// removeCgroupTree removes cgroup directories bottom-up (rmdir, as cgroupfs wants).
func removeCgroupTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	for i := 0; ; i++ {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || i == 50 {
			return err
		}
		time.Sleep(20 * time.Millisecond) // a killed child leaves its cgroup a moment later
	}
}

// spawn starts a real sleep and moves it into path (relative to the
// sandbox) in every hierarchy; v1Path, when set, overrides the v1 path.
func (s *cgroupSandbox) spawn(path string, v1Path ...string) int32 {
	s.t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for _, r := range s.roots {
		p := path
		if r == s.v1 && len(v1Path) > 0 {
			p = v1Path[0]
		}
		dir := s.mkdir(r, p)
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			s.t.Fatalf("move pid %d into %s: %v", cmd.Process.Pid, dir, err)
		}
	}
	return int32(cmd.Process.Pid)
}

func cgroupfsPath(uid, cid string) string {
	return "kubepods/burstable/pod" + uid + "/" + cid
}

func systemdPath(uid, cid string) string {
	u := strings.ReplaceAll(uid, "-", "_")
	return "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + u + ".slice/cri-containerd-" + cid + ".scope"
}

func TestAttestRealProcessesInRealCgroups(t *testing.T) {
	testutil.RequireRoot(t)
	sb := newCgroupSandbox(t)

	// The kubelet stand-in: HTTPS on 127.0.0.1, certificate for the node name only.
	ca := newTestCA(t, "kubelet-ca")
	k := startKubelet(t, standInOptions{
		tls:   &tls.Config{Certificates: []tls.Certificate{ca.serving(t, []string{"node-a"}, nil)}},
		token: "agent-token",
	})
	dir := t.TempDir()

	web := richPod()
	hostPath := withContainer(newPod("shop", "hostpath", uidN(2), "web-sa"), "app", "nginx:1.27", cidN(21))
	impostor := withContainer(newPod("shop", "impostor", uidN(3), "builder"), "app", "nginx:1.27", cidN(31))
	starting := withContainer(newPod("shop", "starting", uidN(4), "web-sa"), "app", "nginx:1.27", "")
	systemd := withContainer(newPod("bank", "ledger", uidN(5), "ledger"), "app", "ledger:2", cidN(51))
	late := withContainer(newPod("shop", "late", uidN(6), "web-sa"), "app", "nginx:1.27", cidN(61))
	k.setPods(web, hostPath, impostor, starting, systemd)

	impostorRecord := recordFor(impostor)
	impostorRecord.ServiceAccount = "web-sa" // what the CSI publish said; the kubelet says builder
	store := openRecords(t, recordFor(web), impostorRecord, recordFor(starting), recordFor(systemd), recordFor(late))

	client := mustClient(t, KubeletConfig{
		Host:      "127.0.0.1",
		Port:      k.port(),
		NodeName:  "node-a",
		CAFile:    writeFile(t, dir, "ca.crt", ca.pem),
		TokenFile: writeFile(t, dir, "token", []byte("agent-token")),
	})
	a := newAttestor(t, Options{Pods: client, Records: store, NodeName: client.NodeName()})

	pApp := sb.spawn(cgroupfsPath(uidN(1), cidN(13)))
	pProxy := sb.spawn(cgroupfsPath(uidN(1), cidN(12)))
	pHostPath := sb.spawn(cgroupfsPath(uidN(2), cidN(21)))
	pImpostor := sb.spawn(cgroupfsPath(uidN(3), cidN(31)))
	pStarting := sb.spawn(cgroupfsPath(uidN(4), cidN(41)))
	pSystemd := sb.spawn(systemdPath(uidN(5), cidN(51)))
	pHost := sb.spawn("system.slice/example.service")
	// A user with a delegated cgroup subtree names cgroups after a real pod
	// that has a mount record, and moves its own process there.
	var b [6]byte
	rand.Read(b[:])
	pSpoof := sb.spawn("csi-agent-test-" + hex.EncodeToString(b[:]) + ".slice/user@1000.service/" + cgroupfsPath(uidN(1), cidN(13)))

	t.Run("pod-named cgroup outside the kubepods hierarchy", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pSpoof)
		if !errors.Is(err, attestor.ErrDenied) || attrs != nil {
			t.Fatalf("(%v, %v), want denied", attrs, err)
		}
	})

	t.Run("identity", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pApp)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{
			field.K8sNamespace: "shop", field.K8sPodName: "web-7d9f", field.K8sPodUID: uidN(1), field.K8sServiceAccount: "web-sa",
			field.K8sNodeName: "node-a", field.K8sContainerName: "app", field.K8sContainerID: cidN(13),
			field.K8sContainerType: ContainerTypeContainer, field.K8sContainerImage: "docker.io/library/nginx:1.27",
			field.K8sPodOwnerKind: "ReplicaSet", field.K8sPodLabelPrefix + "app": "web", field.K8sPodImageCount: "2",
		}
		for f, v := range want {
			if got, _ := attrs.Get(f); got != v {
				t.Errorf("%s = %q, want %q", f, got, v)
			}
		}
	})
	t.Run("native sidecar", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pProxy)
		if err != nil {
			t.Fatal(err)
		}
		if typ, _ := attrs.Get(field.K8sContainerType); typ != ContainerTypeSidecar {
			t.Fatalf("container type %q, want sidecar", typ)
		}
	})
	t.Run("systemd cgroup names", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pSystemd)
		if err != nil {
			t.Fatal(err)
		}
		if ns, _ := attrs.Get(field.K8sNamespace); ns != "bank" {
			t.Fatalf("namespace %q", ns)
		}
	})
	t.Run("hostPath socket, no mount record", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pHostPath)
		if !errors.Is(err, attestor.ErrDenied) || attrs != nil {
			t.Fatalf("(%v, %v), want denied", attrs, err)
		}
	})
	t.Run("service account differs from record", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pImpostor)
		if !errors.Is(err, attestor.ErrDenied) || !strings.Contains(err.Error(), "service account") || attrs != nil {
			t.Fatalf("(%v, %v), want denied over the service account", attrs, err)
		}
	})
	t.Run("postStart: pod-level within a second", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		attrs, err := a.Attest(ctx, pStarting)
		if err != nil {
			t.Fatalf("no answer within 1s: %v", err)
		}
		if uid, _ := attrs.Get(field.K8sPodUID); uid != uidN(4) {
			t.Fatalf("pod UID %q", uid)
		}
		for _, f := range []string{field.K8sContainerID, field.K8sContainerName, field.K8sContainerType, field.K8sContainerImage} {
			if _, ok := attrs[f]; ok {
				t.Fatalf("%s present before the kubelet reported the container", f)
			}
		}
	})
	t.Run("not in a pod", func(t *testing.T) {
		attrs, err := a.Attest(context.Background(), pHost)
		if attrs != nil || err != nil {
			t.Fatalf("(%v, %v), want (nil, nil)", attrs, err)
		}
	})
	t.Run("hierarchies disagree", func(t *testing.T) {
		if sb.v1 == "" || sb.v2 == "" {
			t.Skip("needs both a v1 and a v2 hierarchy")
		}
		p := sb.spawn(cgroupfsPath(uidN(7), cidN(71)), cgroupfsPath(uidN(1), cidN(13)))
		if _, err := a.Attest(context.Background(), p); !errors.Is(err, attestor.ErrDenied) || !strings.Contains(err.Error(), "conflicts") {
			t.Fatalf("err = %v, want denied over conflicting cgroups", err)
		}
	})
	t.Run("process gone", func(t *testing.T) {
		cmd := exec.Command("true")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Attest(context.Background(), int32(cmd.Process.Pid)); !errors.Is(err, attestor.ErrDenied) {
			t.Fatalf("err = %v, want denied", err)
		}
	})
	t.Run("kubelet down, then back", func(t *testing.T) {
		pLate := sb.spawn(cgroupfsPath(uidN(6), cidN(61)))
		k.stop()
		_, err := a.Attest(context.Background(), pLate)
		if !errors.Is(err, attestor.ErrUnavailable) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("kubelet down: err = %v, want Unavailable with the cause", err)
		}
		k.addPods(late)
		k.restart()
		attrs, err := a.Attest(context.Background(), pLate)
		if err != nil {
			t.Fatalf("kubelet back: %v", err)
		}
		if name, _ := attrs.Get(field.K8sPodName); name != "late" {
			t.Fatalf("pod name %q", name)
		}
	})
	if got, served := a.KubeletRequests(), uint64(k.requests.Load()); got < served {
		t.Fatalf("attestor counted %d requests, kubelet served %d", got, served)
	}
}
