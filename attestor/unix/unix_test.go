package unix

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"github.com/csi-agent/csi-agent/attestor/field"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	sysunix "golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

func itoa[T ~int | ~uint32 | ~int32](v T) string { return strconv.FormatInt(int64(v), 10) }

func TestAttestSelf(t *testing.T) {
	a := newTest(t, Options{})
	attrs, err := a.Attest(context.Background(), int32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		field.UnixPID: itoa(os.Getpid()),
		field.UnixUID: itoa(os.Geteuid()),
		field.UnixGID: itoa(os.Getegid()),
	}
	for f, v := range want {
		if got, _ := attrs.Get(f); got != v {
			t.Errorf("%s = %q, want %q (all: %v)", f, got, v, attrs)
		}
	}
	groups, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	var wantGroups []string
	for _, g := range groups {
		wantGroups = append(wantGroups, itoa(g))
	}
	if got := attrs[field.UnixSupplementaryGID]; !reflect.DeepEqual(got, wantGroups) {
		t.Errorf("%s = %v, want %v", field.UnixSupplementaryGID, got, wantGroups)
	}
	// Names against the standard library's independent lookup.
	if u, err := user.LookupId(itoa(os.Geteuid())); err == nil {
		if got, _ := attrs.Get(field.UnixUser); got != u.Username {
			t.Errorf("%s = %q, want %q", field.UnixUser, got, u.Username)
		}
	}
	if g, err := user.LookupGroupId(itoa(os.Getegid())); err == nil {
		if got, _ := attrs.Get(field.UnixGroup); got != g.Name {
			t.Errorf("%s = %q, want %q", field.UnixGroup, got, g.Name)
		}
	}
	for _, f := range []string{field.UnixPath, field.UnixSHA256} {
		if attrs.Has(f, "") || len(attrs[f]) > 0 {
			t.Errorf("%s present without opting in: %v", f, attrs[f])
		}
	}
}

// startProcess runs exe with args and stops it at cleanup.
func startProcess(t testing.TB, cred *syscall.Credential, exe string, args ...string) *exec.Cmd {
	t.Helper()
	var cmd *exec.Cmd
	for try := 0; ; try++ {
		cmd = exec.Command(exe, args...)
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		err := cmd.Start()
		if err == nil {
			break
		}
		// A freshly written binary can be briefly busy while a concurrent
		// fork still holds its write descriptor.
		if errors.Is(err, syscall.ETXTBSY) && try < 50 {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func sleepBinary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	p, err = filepath.EvalSymlinks(p)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAttestOtherUser(t *testing.T) {
	testutil.RequireRoot(t)
	tests := []struct {
		name   string
		groups []uint32
	}{
		{name: "no supplementary groups"},
		{name: "supplementary groups", groups: []uint32{4, 100, 4242}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := startProcess(t, &syscall.Credential{Uid: 65534, Gid: 65534, Groups: tt.groups}, sleepBinary(t), "60")
			attrs, err := newTest(t, Options{}).Attest(context.Background(), int32(cmd.Process.Pid))
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := attrs.Get(field.UnixUID); got != "65534" {
				t.Errorf("uid = %q (all: %v)", got, attrs)
			}
			if got, _ := attrs.Get(field.UnixGID); got != "65534" {
				t.Errorf("gid = %q (all: %v)", got, attrs)
			}
			var wantGIDs, wantNames []string
			for _, g := range tt.groups {
				wantGIDs = append(wantGIDs, itoa(g))
				if grp, err := user.LookupGroupId(itoa(g)); err == nil {
					wantNames = append(wantNames, grp.Name)
				}
			}
			if got := attrs[field.UnixSupplementaryGID]; !reflect.DeepEqual(got, wantGIDs) {
				t.Errorf("supplementary gids = %v, want %v", got, wantGIDs)
			}
			if got := attrs[field.UnixSupplementaryGroup]; !reflect.DeepEqual(got, wantNames) {
				t.Errorf("supplementary groups = %v, want %v", got, wantNames)
			}
			if u, err := user.LookupId("65534"); err == nil {
				if got, _ := attrs.Get(field.UnixUser); got != u.Username {
					t.Errorf("user = %q, want %q", got, u.Username)
				}
			} else if attrs[field.UnixUser] != nil {
				t.Errorf("user = %v for an unknown uid", attrs[field.UnixUser])
			}
		})
	}
}

func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func copyFile(t testing.TB, src, dst string, extra []byte) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, append(b, extra...), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestAttestBinary(t *testing.T) {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "workload")
	copyFile(t, sleepBinary(t), bin, nil)
	info, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}

	cmd := startProcess(t, nil, bin, "60")
	pid := int32(cmd.Process.Pid)
	want := fileSHA256(t, bin)

	tests := []struct {
		name     string
		opts     Options
		wantPath bool
		wantSum  bool
	}{
		{name: "path only", opts: Options{WorkloadPath: true}, wantPath: true},
		{name: "sha256 only", opts: Options{WorkloadSHA256: true}, wantSum: true},
		{name: "both", opts: Options{WorkloadPath: true, WorkloadSHA256: true}, wantPath: true, wantSum: true},
		{name: "at the size limit", opts: Options{WorkloadSHA256: true, MaxBinarySize: info.Size()}, wantSum: true},
		{name: "over the size limit", opts: Options{WorkloadPath: true, WorkloadSHA256: true, MaxBinarySize: info.Size() - 1}, wantPath: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newTest(t, tt.opts)
			for i := 0; i < 2; i++ { // the second round may come from the cache
				attrs, err := a.Attest(context.Background(), pid)
				if err != nil {
					t.Fatal(err)
				}
				checkField(t, attrs, field.UnixPath, bin, tt.wantPath)
				checkField(t, attrs, field.UnixSHA256, want, tt.wantSum)
			}
		})
	}

	// A new binary version at the same path gets its own digest.
	cmd.Process.Kill()
	cmd.Wait()
	copyFile(t, sleepBinary(t), bin, []byte("trailing bytes change the digest"))
	cmd2 := startProcess(t, nil, bin, "60")
	want2 := fileSHA256(t, bin)
	if want2 == want {
		t.Fatal("test binary did not change")
	}
	attrs, err := newTest(t, Options{WorkloadSHA256: true}).Attest(context.Background(), int32(cmd2.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	checkField(t, attrs, field.UnixSHA256, want2, true)
}

func TestAttestDeletedBinary(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "workload")
	copyFile(t, sleepBinary(t), bin, nil)
	want := fileSHA256(t, bin)
	cmd := startProcess(t, nil, bin, "60")
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	attrs, err := newTest(t, Options{WorkloadPath: true, WorkloadSHA256: true}).Attest(context.Background(), int32(cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// The digest is of what runs, found through /proc/<pid>/exe.
	checkField(t, attrs, field.UnixSHA256, want, true)
	if p, _ := attrs.Get(field.UnixPath); !strings.HasSuffix(p, " (deleted)") {
		t.Errorf("path = %q, want the kernel's deleted marker", p)
	}
}

func checkField(t *testing.T, attrs attestor.Attributes, field, want string, present bool) {
	t.Helper()
	got, ok := attrs.Get(field)
	switch {
	case present && (!ok || got != want):
		t.Errorf("%s = %v, want %q", field, attrs[field], want)
	case !present && len(attrs[field]) > 0:
		t.Errorf("%s = %v, want absent", field, attrs[field])
	}
}

func TestAttestGoneProcess(t *testing.T) {
	a := newTest(t, Options{WorkloadPath: true, WorkloadSHA256: true})

	t.Run("reaped", func(t *testing.T) {
		cmd := exec.Command(sleepBinary(t), "0")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		_, err := a.Attest(context.Background(), int32(cmd.Process.Pid))
		if !errors.Is(err, attestor.ErrDenied) {
			t.Fatalf("Attest of reaped pid = %v, want ErrDenied", err)
		}
	})
	t.Run("zombie", func(t *testing.T) {
		cmd := startProcess(t, nil, sleepBinary(t), "0")
		var si sysunix.Siginfo
		for {
			err := sysunix.Waitid(sysunix.P_PID, cmd.Process.Pid, &si, sysunix.WEXITED|sysunix.WNOWAIT, nil)
			if err == sysunix.EINTR {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		_, err := a.Attest(context.Background(), int32(cmd.Process.Pid))
		if !errors.Is(err, attestor.ErrDenied) {
			t.Fatalf("Attest of zombie = %v, want ErrDenied", err)
		}
	})
	for _, pid := range []int32{0, -1} {
		if _, err := a.Attest(context.Background(), pid); !errors.Is(err, attestor.ErrDenied) {
			t.Errorf("Attest(%d) = %v, want ErrDenied", pid, err)
		}
	}
}

// fakeProc builds a procfs-like tree: one directory per pid with its status
// and optionally an exe symlink.
type fakeProcess struct {
	status string
	exe    string // symlink target, optional
}

func fakeProc(t *testing.T, procs map[int32]fakeProcess) string {
	t.Helper()
	root := t.TempDir()
	for pid, p := range procs {
		dir := filepath.Join(root, itoa(pid))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "status"), []byte(p.status), 0o444); err != nil {
			t.Fatal(err)
		}
		if p.exe != "" {
			if err := os.Symlink(p.exe, filepath.Join(dir, "exe")); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

func status(state, uid, gid, groups string) string {
	return "Name:\tw\nState:\t" + state + "\nUid:\t" + uid + "\t" + uid + "\t" + uid + "\t" + uid +
		"\nGid:\t" + gid + "\t" + gid + "\t" + gid + "\t" + gid + "\nGroups:\t" + groups + "\n"
}

func TestAttestFakeProcRoot(t *testing.T) {
	etc := t.TempDir()
	passwd := filepath.Join(etc, "passwd")
	group := filepath.Join(etc, "group")
	if err := os.WriteFile(passwd, []byte("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(group, []byte("root:x:0:\nalice:x:1000:\nvideo:x:44:alice\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(etc, "bin")
	if err := os.WriteFile(bin, []byte("not really a binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	binSum := fileSHA256(t, bin)

	root := fakeProc(t, map[int32]fakeProcess{
		100: {status: status("S (sleeping)", "1000", "1000", "44 2000"), exe: bin},
		101: {status: status("R (running)", "3000", "3000", "")},
		102: {status: status("Z (zombie)", "1000", "1000", "")},
		103: {status: "Name:\tw\nState:\tS\nUid:\t1\n"},
		104: {status: status("S (sleeping)", "0", "0", ""), exe: filepath.Join(etc, "missing")},
		105: {status: status("S (sleeping)", "0", "0", ""), exe: etc},
	})

	tests := []struct {
		name     string
		pid      int32
		opts     Options
		want     attestor.Attributes
		wantErr  bool
		wantDeny bool
	}{
		{
			name: "known user and groups", pid: 100,
			want: attestor.Attributes{
				field.UnixPID: {"100"}, field.UnixUID: {"1000"}, field.UnixUser: {"alice"}, field.UnixGID: {"1000"}, field.UnixGroup: {"alice"},
				field.UnixSupplementaryGID: {"44", "2000"}, field.UnixSupplementaryGroup: {"video"},
			},
		},
		{
			name: "path and sha256", pid: 100, opts: Options{WorkloadPath: true, WorkloadSHA256: true},
			want: attestor.Attributes{
				field.UnixPID: {"100"}, field.UnixUID: {"1000"}, field.UnixUser: {"alice"}, field.UnixGID: {"1000"}, field.UnixGroup: {"alice"},
				field.UnixSupplementaryGID: {"44", "2000"}, field.UnixSupplementaryGroup: {"video"},
				field.UnixPath: {bin}, field.UnixSHA256: {binSum},
			},
		},
		{
			name: "sha256 over the limit", pid: 100, opts: Options{WorkloadSHA256: true, MaxBinarySize: 3},
			want: attestor.Attributes{
				field.UnixPID: {"100"}, field.UnixUID: {"1000"}, field.UnixUser: {"alice"}, field.UnixGID: {"1000"}, field.UnixGroup: {"alice"},
				field.UnixSupplementaryGID: {"44", "2000"}, field.UnixSupplementaryGroup: {"video"},
			},
		},
		{
			name: "unknown user and group", pid: 101,
			want: attestor.Attributes{field.UnixPID: {"101"}, field.UnixUID: {"3000"}, field.UnixGID: {"3000"}},
		},
		{name: "zombie", pid: 102, wantDeny: true},
		{name: "no such pid", pid: 999, wantDeny: true},
		{name: "malformed status", pid: 103, wantErr: true},
		{name: "exe gone", pid: 104, opts: Options{WorkloadSHA256: true}, wantDeny: true},
		{name: "exe not a regular file", pid: 105, opts: Options{WorkloadSHA256: true}, wantErr: true},
		{name: "no exe link", pid: 101, opts: Options{WorkloadPath: true}, wantDeny: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := tt.opts
			opts.ProcRoot, opts.PasswdFile, opts.GroupFile = root, passwd, group
			got, err := newTest(t, opts).Attest(context.Background(), tt.pid)
			switch {
			case tt.wantDeny:
				if !errors.Is(err, attestor.ErrDenied) {
					t.Fatalf("Attest = %v, %v; want ErrDenied", got, err)
				}
			case tt.wantErr:
				if err == nil || errors.Is(err, attestor.ErrDenied) {
					t.Fatalf("Attest = %v, %v; want a non-deny error", got, err)
				}
			case err != nil:
				t.Fatalf("Attest: %v", err)
			case !reflect.DeepEqual(got, tt.want):
				t.Fatalf("Attest =\n %v\nwant\n %v", got, tt.want)
			}
		})
	}
}

func TestAttestMissingNameFiles(t *testing.T) {
	root := fakeProc(t, map[int32]fakeProcess{7: {status: status("S", "0", "0", "0")}})
	missing := filepath.Join(t.TempDir(), "none")
	got, err := newTest(t, Options{ProcRoot: root, PasswdFile: missing, GroupFile: missing}).Attest(context.Background(), 7)
	if err != nil {
		t.Fatal(err)
	}
	want := attestor.Attributes{field.UnixPID: {"7"}, field.UnixUID: {"0"}, field.UnixGID: {"0"}, field.UnixSupplementaryGID: {"0"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Attest = %v, want %v", got, want)
	}
}

func TestAttestCanceledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := newTest(t, Options{}).Attest(ctx, int32(os.Getpid())); !errors.Is(err, context.Canceled) {
		t.Fatalf("Attest = %v, want context.Canceled", err)
	}
}

func TestNameFileFollowsChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "passwd")
	f := nameFile{path: path}
	if got := f.snapshot(); got != nil {
		t.Fatalf("missing file: %v", got)
	}
	for _, name := range []string{"alice", "bob", "carol"} {
		if err := os.WriteFile(path, []byte(name+":x:1000:1000::/:/bin/sh\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := f.snapshot()[1000]; got != name {
			t.Fatalf("name = %q, want %q", got, name)
		}
	}
	os.Remove(path)
	if got := f.snapshot(); got != nil {
		t.Fatalf("removed file: %v", got)
	}
}

func TestNameFileCachesSettledFile(t *testing.T) {
	f := nameFile{path: "/etc/passwd"}
	var st sysunix.Stat_t
	if err := sysunix.Stat(f.path, &st); err != nil {
		t.Skip("no /etc/passwd")
	}
	if keyOf(&st).racy(time.Now()) {
		t.Skip("/etc/passwd changed just now")
	}
	a, b := f.snapshot(), f.snapshot()
	if reflect.ValueOf(a).Pointer() != reflect.ValueOf(b).Pointer() {
		t.Fatal("unchanged file parsed twice")
	}
}

func TestFileKeyRacy(t *testing.T) {
	now := time.Unix(1000, 0)
	tests := []struct {
		ctime time.Time
		want  bool
	}{
		{now.Add(-time.Hour), false},
		{now.Add(-racyWindow - 1), false},
		{now.Add(-racyWindow), true},
		{now, true},
		{now.Add(time.Hour), true}, // clock stepped back: do not trust
	}
	for _, tt := range tests {
		if got := (fileKey{ctime: tt.ctime.UnixNano()}).racy(now); got != tt.want {
			t.Errorf("racy(ctime %v) = %v, want %v", tt.ctime, got, tt.want)
		}
	}
}

func TestDigestCache(t *testing.T) {
	ctx := context.Background()
	settled := fileKey{ino: 1, ctime: time.Now().Add(-time.Hour).UnixNano()}
	fresh := fileKey{ino: 2, ctime: time.Now().UnixNano()}
	var c digestCache
	calls := 0
	hash := func(sum string, err error) func() (string, error) {
		return func() (string, error) { calls++; return sum, err }
	}

	if s, err := c.get(ctx, settled, hash("a", nil)); s != "a" || err != nil {
		t.Fatalf("get = %q %v", s, err)
	}
	if s, _ := c.get(ctx, settled, hash("b", nil)); s != "a" || calls != 1 {
		t.Fatalf("settled version hashed again: %q, %d calls", s, calls)
	}
	other := settled
	other.ctime++
	if s, _ := c.get(ctx, other, hash("c", nil)); s != "c" || calls != 2 {
		t.Fatalf("new version served from cache: %q, %d calls", s, calls)
	}
	for i := 0; i < 2; i++ {
		c.get(ctx, fresh, hash("d", nil))
	}
	if calls != 4 {
		t.Fatalf("fresh version cached: %d calls", calls)
	}
	failing := fileKey{ino: 3, ctime: settled.ctime}
	if _, err := c.get(ctx, failing, hash("", errors.New("boom"))); err == nil {
		t.Fatal("error lost")
	}
	if s, err := c.get(ctx, failing, hash("e", nil)); s != "e" || err != nil {
		t.Fatalf("failure was cached: %q %v", s, err)
	}
}

func BenchmarkAttest(b *testing.B) {
	ctx := context.Background()
	b.Run("self", func(b *testing.B) {
		a := newTest(b, Options{})
		pid := int32(os.Getpid())
		b.ReportAllocs()
		for b.Loop() {
			if _, err := a.Attest(ctx, pid); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The binary of a settled file, so the digest comes from the cache.
	b.Run("path+sha256-cached", func(b *testing.B) {
		cmd := startProcess(b, nil, sleepBinary(b), "600")
		a := newTest(b, Options{WorkloadPath: true, WorkloadSHA256: true})
		pid := int32(cmd.Process.Pid)
		if _, err := a.Attest(ctx, pid); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := a.Attest(ctx, pid); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("sha256-uncached-43KiB", func(b *testing.B) {
		cmd := startProcess(b, nil, sleepBinary(b), "600")
		pid := int32(cmd.Process.Pid)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := newTest(b, Options{WorkloadSHA256: true}).Attest(ctx, pid); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// newTest fills what internal/config would and fails the test on an error.
func newTest(tb testing.TB, opts Options) *Attestor {
	tb.Helper()
	if opts.ProcRoot == "" {
		opts.ProcRoot = "/proc"
	}
	if opts.PasswdFile == "" {
		opts.PasswdFile = "/etc/passwd"
	}
	if opts.GroupFile == "" {
		opts.GroupFile = "/etc/group"
	}
	if opts.MaxBinarySize == 0 {
		opts.MaxBinarySize = 128 << 20
	}
	a, err := New(opts)
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

func TestNewRejectsImpossibleOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"no proc root", Options{PasswdFile: "/etc/passwd", GroupFile: "/etc/group"}, "proc root"},
		{"relative proc root", Options{ProcRoot: "proc", PasswdFile: "/etc/passwd", GroupFile: "/etc/group"}, "proc root"},
		{"no passwd file", Options{ProcRoot: "/proc", GroupFile: "/etc/group"}, "passwd"},
		{"no group file", Options{ProcRoot: "/proc", PasswdFile: "/etc/passwd"}, "group"},
		{"sha256 without size bound", Options{ProcRoot: "/proc", PasswdFile: "/etc/passwd", GroupFile: "/etc/group", WorkloadSHA256: true}, "binary size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error about %s", err, tc.want)
			}
		})
	}
}
