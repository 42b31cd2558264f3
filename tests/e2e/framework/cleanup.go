package framework

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The kubelet rewrites these host sysctls at start; they are put back.
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// state is what teardown needs to restore the machine, kept on disk so that
// a later run (or tests/e2e/run.sh's trap) can finish the job after a crash.
type state struct {
	Sysctls   map[string]string     `json:"sysctls"`
	Created   []string              `json:"created"` // paths outside Base that we created
	Procs     map[string]ProcRecord `json:"procs"`
	APIServer string                `json:"apiserver"`
	// ControlPlaneOnly marks a StartControlPlane base: no kubelet, so no
	// containers, kubepods cgroups or sysctls to restore.
	ControlPlaneOnly bool `json:"controlPlaneOnly,omitempty"`
}

const stateFile = "state.json"

func newState() (*state, error) {
	st := &state{Sysctls: map[string]string{}, Procs: map[string]ProcRecord{}}
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return nil, err
		}
		st.Sysctls[k] = strings.TrimSpace(string(b))
	}
	return st, nil
}

// remember records that p is about to be created by the node, unless it exists.
func (s *state) remember(p string) error {
	if _, err := os.Lstat(p); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	s.Created = append(s.Created, p)
	return nil
}

func (s *state) save(base string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(base, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(base, stateFile))
}

func loadState(base string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(base, stateFile))
	if err != nil {
		return nil, err
	}
	st := &state{}
	return st, json.Unmarshal(b, st)
}

// Cleanup tears down whatever a run under base left behind, in the order
// that leaves nothing: kubelet, containers, containerd and its shims, other
// recorded processes, API server, etcd, then mounts, kubepods cgroups,
// sysctls, created paths and base itself (a control-plane-only base has no
// node parts). It only signals processes recorded in base's state (ours)
// and processes inside our kubepods cgroups. artifacts, when set, receives
// the component and pod logs first.
func Cleanup(base, artifacts string, logf func(string, ...any)) error {
	if _, err := os.Stat(base); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	st, err := loadState(base)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %w", filepath.Join(base, stateFile), err)
	}
	if st == nil {
		st = &state{Procs: map[string]ProcRecord{}}
	}
	d := newDirs(base)
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
			logf("cleanup: %v", err)
		}
	}
	node := !st.ControlPlaneOnly
	if node {
		note(stopRecord(st.Procs["kubelet"], 15*time.Second))
		if st.Procs["containerd"].alive() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			removeContainers(ctx, d.ctrdSock)
			cancel()
		}
		note(killKubepods())
		note(removePodBridge())
		note(stopRecord(st.Procs["containerd"], 15*time.Second))
		note(killShims(d.ctrdState))
	}
	// Processes a test started beside the control plane (StartProcess) go
	// before the API server they talk to.
	for _, name := range sortedKeys(st.Procs) {
		switch name {
		case "kubelet", "containerd", "kube-apiserver", "etcd":
		default:
			note(stopRecord(st.Procs[name], 15*time.Second))
		}
	}
	note(stopRecord(st.Procs["kube-apiserver"], 15*time.Second))
	note(stopRecord(st.Procs["etcd"], 15*time.Second))
	if artifacts != "" {
		note(saveLogs(d, artifacts))
		logf("cleanup: logs saved in %s", artifacts)
	}
	note(unmountUnder(base))
	if node {
		note(removeKubepods())
		for k, v := range st.Sysctls {
			note(os.WriteFile("/proc/sys/"+k, []byte(v), 0o644))
		}
		note(removeLinksInto("/var/log/containers", base))
	}
	for i := len(st.Created) - 1; i >= 0; i-- {
		note(removeAll(st.Created[i]))
	}
	if len(errs) == 0 {
		note(removeAll(base))
	} else {
		logf("cleanup: %s kept for inspection", base)
	}
	return errors.Join(errs...)
}

// removeContainers kills and deletes every container task and container the
// node's containerd knows, sandboxes included.
func removeContainers(ctx context.Context, sock string) {
	out, _ := ctrOut(ctx, sock, "tasks", "ls", "-q")
	for _, id := range strings.Fields(out) {
		_, _ = ctrOut(ctx, sock, "tasks", "kill", "-s", "SIGKILL", id)
	}
	for _, id := range strings.Fields(out) {
		_, _ = ctrOut(ctx, sock, "tasks", "delete", "-f", id)
	}
	out, _ = ctrOut(ctx, sock, "containers", "ls", "-q")
	for _, id := range strings.Fields(out) {
		_, _ = ctrOut(ctx, sock, "containers", "rm", id)
	}
}

// cgroupMounts lists the mount points of every cgroup hierarchy.
func cgroupMounts() []string {
	var out []string
	for _, m := range readMountinfo("/proc/self/mountinfo") {
		if m.FSType == "cgroup" || m.FSType == "cgroup2" {
			out = append(out, m.MountPoint)
		}
	}
	return out
}

// killKubepods SIGKILLs what is left in the node's pod cgroups: containers
// whose shim or containerd is already gone.
func killKubepods() error {
	var pids []int
	for _, m := range cgroupMounts() {
		_ = filepath.WalkDir(filepath.Join(m, "kubepods"), func(p string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, pid := range pids {
		if st, err := startTime(pid); err == nil && !waitGone(ProcRecord{PID: pid, StartTime: st}, 10*time.Second) {
			return fmt.Errorf("pod process %d survived SIGKILL", pid)
		}
	}
	return nil
}

// killShims stops the containerd shims of the node's containerd: a shim
// runs in its task's bundle directory, under the node's containerd state,
// which identifies it as ours without trusting a name.
func killShims(ctrdState string) error {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
		if err != nil || !under(strings.TrimSuffix(cwd, " (deleted)"), ctrdState) {
			continue
		}
		if st, err := startTime(pid); err == nil {
			errs = append(errs, stopRecord(ProcRecord{PID: pid, StartTime: st}, 5*time.Second))
		}
	}
	return errors.Join(errs...)
}

// Mount is one line of /proc/<pid>/mountinfo.
type Mount struct {
	Root, MountPoint, Options, FSType, Source string
}

// ReadOnly reports the per-mount read-only flag.
func (m Mount) ReadOnly() bool {
	for _, o := range strings.Split(m.Options, ",") {
		if o == "ro" {
			return true
		}
	}
	return false
}

func readMountinfo(path string) []Mount {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	return parseMountinfo(bufio.NewScanner(f))
}

func parseMountinfo(sc *bufio.Scanner) []Mount {
	var out []Mount
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if len(f) < 6 || sep < 0 || len(f) < sep+3 {
			continue
		}
		out = append(out, Mount{Root: unescape(f[3]), MountPoint: unescape(f[4]), Options: f[5], FSType: f[sep+1], Source: unescape(f[sep+2])})
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// unmountUnder detaches every mount at or below dir, deepest first, until
// none is left (the kubelet bind-mounts its root-dir onto itself, pods
// stack volume mounts inside it).
func unmountUnder(dir string) error {
	for range 20 {
		var mps []string
		for _, m := range readMountinfo("/proc/self/mountinfo") {
			if under(m.MountPoint, dir) {
				mps = append(mps, m.MountPoint)
			}
		}
		if len(mps) == 0 {
			return nil
		}
		sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
		for _, mp := range mps {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
		}
	}
	return fmt.Errorf("mounts left under %s", dir)
}

// removeKubepods removes the kubepods cgroup trees, leaves first.
func removeKubepods() error {
	var errs []error
	for _, m := range cgroupMounts() {
		root := filepath.Join(m, "kubepods")
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for range 50 { // a cgroup is busy for a moment after its last process exits
				if err = unix.Rmdir(dirs[i]); err == nil || errors.Is(err, unix.ENOENT) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeLinksInto removes the kubelet's container log links in dir that
// point into base, for when dir existed before the run.
func removeLinksInto(dir, base string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if target, err := os.Readlink(p); err == nil && under(target, base) {
			if err := os.Remove(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// removeAll removes a tree, refusing when a mount is still inside it.
func removeAll(p string) error {
	for _, m := range readMountinfo("/proc/self/mountinfo") {
		if under(m.MountPoint, p) {
			return fmt.Errorf("not removing %s: %s is still mounted", p, m.MountPoint)
		}
	}
	return os.RemoveAll(p)
}

func saveLogs(d dirs, artifacts string) error {
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		return err
	}
	// cp -a keeps the pod log tree's layout; logs are the only thing kept.
	for _, src := range []string{d.logs, d.podLogs} {
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if out, err := exec.Command("cp", "-a", src, artifacts+"/").CombinedOutput(); err != nil {
			return fmt.Errorf("saving %s: %w: %s", src, err, out)
		}
	}
	return nil
}
