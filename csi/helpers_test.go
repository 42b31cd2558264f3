package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/internal/testutil"
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
	// mounter is what every Driver of the env gets (nil: NewMounter()); it
	// outlives a restart, as the kernel's mounts do.
	mounter Mounter
	// fake is mounter when the mounts are held in memory; nil when they
	// are the kernel's.
	fake *fakeMounter
}

// newEnv is an env with the kernel's mounts.
func newEnv(t testing.TB) *env {
	return newEnvWithMounter(t, nil)
}

// newFakeEnv is an env whose mounts are held in memory: no root needed.
func newFakeEnv(t testing.TB) *env {
	f := newFakeMounter()
	e := newEnvWithMounter(t, f)
	e.fake = f
	return e
}

func newEnvWithMounter(t testing.TB, m Mounter) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{
		root:        root,
		kubeletRoot: filepath.Join(root, "kubelet"),
		socketDir:   filepath.Join(root, "spire-agent"),
		stateDir:    filepath.Join(root, "state"),
		mounter:     m,
	}
	// Registered after TempDir, so it runs before the directory is removed.
	t.Cleanup(func() { cleanupMounts(t, root) })
	for _, dir := range []string{e.kubeletRoot, e.socketDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.openDriver(t)
	return e
}

// forEachBackend runs test as subtests, once for each place a test's mounts
// can live: the kernel (root only; CI runs it as root) and memory (the
// driver's logic, unprivileged).
func forEachBackend(t *testing.T, test func(t *testing.T, e *env)) {
	for _, b := range []struct {
		name   string
		newEnv func(testing.TB) *env
	}{
		{"kernel", func(t testing.TB) *env { testutil.RequireRoot(t); return newEnv(t) }},
		{"fake", newFakeEnv},
	} {
		t.Run(b.name, func(t *testing.T) { test(t, b.newEnv(t)) })
	}
}

// openDriver opens the store and a Driver afresh, as a restarted agent does.
func (e *env) openDriver(t testing.TB) {
	t.Helper()
	// The store is single-process: the "crashed" agent's handle goes first.
	e.closeStore()
	store, err := records.Open(e.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	d, err := New(Options{
		DriverName:           config.DefaultDriverName,
		Version:              "test",
		NodeID:               "node-1",
		KubeletRootDir:       e.kubeletRoot,
		WorkloadAPISocketDir: e.socketDir,
		Records:              store,
		Mounter:              e.mounter,
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
	return mountpoints(ms)
}

func mountpoints(ms []*mountinfo.Info) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Mountpoint)
	}
	sort.Strings(out)
	return out
}

// mountsAt is mountsAt in the env's backend.
func (e *env) mountsAt(t testing.TB, path string) []*mountinfo.Info {
	t.Helper()
	if e.fake == nil {
		return mountsAt(t, path)
	}
	return layersAt(e.fake.table(), path)
}

// mountsUnder is mountsUnder in the env's backend.
func (e *env) mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	if e.fake == nil {
		return mountsUnder(t, dir)
	}
	var ms []*mountinfo.Info
	for _, m := range e.fake.table() {
		if isUnder(m.Mountpoint, dir) {
			ms = append(ms, m)
		}
	}
	return mountpoints(ms)
}

// The env methods below change the mounts behind the driver's back, as a
// crash, a reboot or another program would.

// change runs the backend's side of a change, failing the test on error.
func (e *env) change(t testing.TB, fake func(*fakeMounter) error, kernel func() error) {
	t.Helper()
	var err error
	if e.fake != nil {
		err = fake(e.fake)
	} else {
		err = kernel()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// bindSocketDir binds the socket directory on target: read-only (and
// nothing else) when ro, else writable.
func (e *env) bindSocketDir(t testing.TB, target string, ro bool) {
	t.Helper()
	e.change(t, func(f *fakeMounter) error {
		return f.bind(e.socketDir, target, map[bool]string{true: "ro", false: "rw"}[ro])
	}, func() error {
		if ro {
			return bindMountPath(e.socketDir, target, unix.MS_RDONLY)
		}
		return unix.Mount(e.socketDir, target, "", unix.MS_BIND, "")
	})
}

// mountTmpfs mounts a tmpfs, a mount that is not the driver's, on target.
func (e *env) mountTmpfs(t testing.TB, target string) {
	t.Helper()
	e.change(t, func(f *fakeMounter) error { return f.tmpfs(target) },
		func() error { return unix.Mount("tmpfs", target, "tmpfs", 0, "size=1m") })
}

// remountWritable drops the flags of the top mount at target.
func (e *env) remountWritable(t testing.TB, target string) {
	t.Helper()
	e.change(t, func(f *fakeMounter) error { return f.remountWritable(target) },
		func() error { return unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT, "") })
}

// unmountTop removes the top mount at target.
func (e *env) unmountTop(t testing.TB, target string) {
	t.Helper()
	e.change(t, func(f *fakeMounter) error { return f.unmountPath(target) },
		func() error { return unix.Unmount(target, 0) })
}

// unmountUnder removes every mount at or below dir.
func (e *env) unmountUnder(t testing.TB, dir string) {
	if e.fake != nil {
		e.fake.unmountUnder(dir)
		return
	}
	cleanupMounts(t, dir)
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

// bindMountPath is bindMount on a path, for setting up tests.
func bindMountPath(source, target string, flags uintptr) error {
	f, err := os.OpenFile(target, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	mnt, err := bindMount(source, f, flags)
	if mnt != nil {
		mnt.Close()
	}
	return err
}

// openedPath is the path of the directory open as f: the fake mounter
// keeps its table by path.
func openedPath(f *os.File) (string, error) {
	return os.Readlink(fdPath(f))
}

// closeStore releases the env's records store, as a process exit would.
func (e *env) closeStore() {
	if e.store != nil {
		e.store.Close()
		e.store = nil
	}
}

// fakeMounter is a Mounter that keeps the mount table in memory, so that the
// driver's logic runs without root. The table starts with a root mount; a
// bind shows the device and root the kernel would show (as sourceOf reads
// them off the table), and a bind whose source directory was deleted, or
// replaced, shows its root as "<root>//deleted", as the kernel does. Mounts
// hide nothing: files under a target stay visible.
type fakeMounter struct {
	mu        sync.Mutex
	mounts    []*mountinfo.Info
	sources   map[int]fakeSource // bind mounts: what they show
	nextID    int
	nextMinor int
	// bindErr, when set, fails every BindMount.
	bindErr error
}

type fakeSource struct {
	path string
	id   fileID
}

// fileID tells a directory from one made later at the same path: the inode
// number alone is often reused at once. birth is zero where unsupported.
type fileID struct {
	ino   uint64
	birth unix.StatxTimestamp
}

func fileIDOf(path string) (fileID, error) {
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_INO|unix.STATX_BTIME, &st); err != nil {
		return fileID{}, err
	}
	id := fileID{ino: st.Ino}
	if st.Mask&unix.STATX_BTIME != 0 {
		id.birth = st.Btime
	}
	return id, nil
}

func newFakeMounter() *fakeMounter {
	return &fakeMounter{
		mounts:    []*mountinfo.Info{{ID: 1, Major: 0, Minor: 1, Root: "/", Mountpoint: "/", Options: "rw", FSType: "fakefs", Source: "fakefs"}},
		sources:   map[int]fakeSource{},
		nextID:    2,
		nextMinor: 2,
	}
}

// BindMount binds on the path the directory open as target has now, as the
// kernel would, and returns a handle on it (the fake keeps no mount roots).
func (f *fakeMounter) BindMount(source string, dir *os.File, options []string) (*os.File, error) {
	target, err := openedPath(dir)
	if err != nil {
		return nil, err
	}
	if _, ok := asBind(options); !ok {
		return nil, fmt.Errorf("fake mount %s on %s: options %q are not a plain bind mount", source, target, options)
	}
	if f.bindErr != nil {
		return nil, f.bindErr
	}
	opts := []string{"rw"}
	for _, o := range options {
		switch o {
		case "bind":
		case "ro":
			opts[0] = "ro"
		default:
			opts = append(opts, o)
		}
	}
	if err := f.bind(source, target, strings.Join(opts, ",")); err != nil {
		return nil, err
	}
	return os.OpenFile(target, unix.O_PATH|unix.O_DIRECTORY, 0)
}

// bind adds a bind mount of source on target with the per-mount options.
// Like mount(2) it needs both to be directories, and follows symlinks.
func (f *fakeMounter) bind(source, target, options string) error {
	src, err := fakeDir(source)
	if err != nil {
		return fmt.Errorf("fake bind %s on %s: %w", source, target, err)
	}
	tgt, err := fakeDir(target)
	if err != nil {
		return fmt.Errorf("fake bind %s on %s: %w", source, target, err)
	}
	id, err := fileIDOf(src)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s, err := sourceOf(f.mounts, src)
	if err != nil {
		return err
	}
	m := f.add(tgt, options)
	m.Major, m.Minor, m.Root, m.FSType, m.Source = s.major, s.minor, s.root, "fakefs", "fakefs"
	f.sources[m.ID] = fakeSource{path: src, id: id}
	return nil
}

func (f *fakeMounter) tmpfs(target string) error {
	tgt, err := fakeDir(target)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	m := f.add(tgt, "rw")
	m.Major, m.Minor, m.Root, m.FSType, m.Source = 0, f.nextMinor, "/", "tmpfs", "tmpfs"
	f.nextMinor++
	return nil
}

// add appends a mount at mountpoint, on top of what is visible there.
func (f *fakeMounter) add(mountpoint, options string) *mountinfo.Info {
	m := &mountinfo.Info{ID: f.nextID, Parent: holder(f.mounts, mountpoint).ID, Mountpoint: mountpoint, Options: options}
	f.nextID++
	f.mounts = append(f.mounts, m)
	return m
}

func fakeDir(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", err
	}
	if fi, err := os.Stat(real); err != nil || !fi.IsDir() {
		return "", fmt.Errorf("%s: %w", path, unix.ENOTDIR)
	}
	return real, nil
}

func (f *fakeMounter) remountWritable(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := top(layersAt(f.mounts, target))
	if m == nil {
		return fmt.Errorf("fake remount %s: %w", target, unix.EINVAL)
	}
	m.Options = "rw"
	return nil
}

// Unmount removes the top mount at the path the directory open as dir has.
func (f *fakeMounter) Unmount(dir *os.File) error {
	target, err := openedPath(dir)
	if err != nil {
		return err
	}
	return f.unmountPath(target)
}

func (f *fakeMounter) unmountPath(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if m := top(layersAt(f.mounts, target)); m != nil {
		f.remove(m)
	}
	return nil
}

func (f *fakeMounter) unmountUnder(dir string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range slices.Clone(f.mounts) {
		if isUnder(m.Mountpoint, dir) {
			f.remove(m)
		}
	}
}

func (f *fakeMounter) remove(m *mountinfo.Info) {
	f.mounts = slices.DeleteFunc(f.mounts, func(o *mountinfo.Info) bool { return o == m })
	delete(f.sources, m.ID)
}

func (f *fakeMounter) IsMountPoint(path string) (bool, error) {
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return len(layersAt(f.table(), path)) > 0, nil
}

func (f *fakeMounter) MountTable() ([]*mountinfo.Info, error) { return f.table(), nil }

// table returns a copy of the mount table, deleted sources marked.
func (f *fakeMounter) table() []*mountinfo.Info {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]*mountinfo.Info, 0, len(f.mounts))
	for _, m := range f.mounts {
		c := *m
		if s, ok := f.sources[m.ID]; ok {
			if id, err := fileIDOf(s.path); err != nil || id != s.id {
				c.Root += "//deleted"
			}
		}
		out = append(out, &c)
	}
	return out
}

func (f *fakeMounter) CheckBind(source string, dir *os.File) error {
	target, err := openedPath(dir)
	if err != nil {
		return err
	}
	table := f.table()
	src, err := sourceOf(table, source)
	if err != nil {
		return err
	}
	m := top(layersAt(table, target))
	switch {
	case m == nil || !src.owns(m):
		return fmt.Errorf("%s does not show the socket directory", target)
	case !hasOpts(m, requiredOpts):
		return fmt.Errorf("the mount at %s has options %q", target, m.Options)
	}
	return nil
}
