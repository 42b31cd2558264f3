package procfs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestNew(t *testing.T) {
	if _, err := New(""); err == nil {
		t.Fatal("New accepted an empty root")
	}
	f, err := New("/proc/")
	if err != nil {
		t.Fatal(err)
	}
	if f.Root() != "/proc" || f.Path(42, "status") != "/proc/42/status" || f.Path(42, "") != "/proc/42" {
		t.Fatalf("Root %q, Path %q %q", f.Root(), f.Path(42, "status"), f.Path(42, ""))
	}
}

// fakeProc is a root with one file, 1/f, of the given content.
func fakeProc(t *testing.T, content string) *FS {
	t.Helper()
	root := t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "1", "f"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestReadFile(t *testing.T) {
	long := strings.Repeat("0123456789abcdef", 1000)
	tests := []struct {
		name    string
		content string
		pid     int32
		bufCap  int
		limit   int
		wantIs  error
	}{
		{name: "small", content: "Name:\tcat\n", pid: 1, limit: 1 << 10},
		{name: "empty", content: "", pid: 1, limit: 1 << 10},
		{name: "grows past the buffer", content: long, pid: 1, bufCap: 16, limit: 1 << 20},
		{name: "grows from nil", content: long, pid: 1, limit: 1 << 20},
		{name: "exactly the limit", content: long, pid: 1, bufCap: 64, limit: len(long)},
		{name: "buffer larger than the limit", content: long, pid: 1, bufCap: 2 * len(long), limit: len(long)},
		{name: "one byte over", content: long, pid: 1, bufCap: 64, limit: len(long) - 1, wantIs: ErrTooLarge},
		{name: "zero limit, empty file", content: "", pid: 1, limit: 0},
		{name: "zero limit", content: "x", pid: 1, limit: 0, wantIs: ErrTooLarge},
		{name: "no such pid", content: "x", pid: 2, limit: 10, wantIs: ErrGone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := fakeProc(t, tt.content)
			got, err := f.ReadFile(tt.pid, "f", make([]byte, 0, tt.bufCap), tt.limit)
			if tt.wantIs != nil {
				if !errors.Is(err, tt.wantIs) {
					t.Fatalf("err = %v, want %v", err, tt.wantIs)
				}
				if !strings.Contains(err.Error(), f.Path(tt.pid, "f")) {
					t.Fatalf("err %q does not name the file", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.content {
				t.Fatalf("read %d bytes, want %d", len(got), len(tt.content))
			}
		})
	}
}

func TestReadFileReusesBuffer(t *testing.T) {
	f := fakeProc(t, "abc")
	buf := make([]byte, 0, 64)
	got, err := f.ReadFile(1, "f", buf, 64)
	if err != nil || string(got) != "abc" {
		t.Fatalf("ReadFile = %q, %v", got, err)
	}
	if &got[0] != &buf[:1][0] {
		t.Fatal("ReadFile did not read into the buffer given")
	}
}

// reapedPID returns the pid of a child that has exited and been reaped.
func reapedPID(t *testing.T) int32 {
	t.Helper()
	cmd := exec.Command("/bin/true")
	if err := cmd.Run(); err != nil {
		t.Skipf("cannot run a child: %v", err)
	}
	return int32(cmd.Process.Pid)
}

func TestRealProc(t *testing.T) {
	f, err := New("/proc")
	if err != nil {
		t.Fatal(err)
	}
	self := int32(os.Getpid())

	status, err := f.ReadFile(self, "status", nil, 1<<20)
	if err != nil || !bytes.Contains(status, []byte("\nPid:\t"+strconv.Itoa(os.Getpid())+"\n")) {
		t.Fatalf("own status: %v\n%s", err, status)
	}
	exe, err := f.Readlink(self, "exe")
	if want, _ := os.Executable(); err != nil || exe != want {
		t.Fatalf("Readlink exe = %q, %v; want %q", exe, err, want)
	}
	fd, err := f.Open(self, "exe")
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		t.Fatalf("exe fstat mode %#o, %v", st.Mode, err)
	}
	unix.Close(fd)

	dirfd, err := f.OpenPIDDir(self)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dirfd)
	stat, err := ReadFileAt(dirfd, "stat", nil, 4096)
	if err != nil || !bytes.HasPrefix(stat, []byte(strconv.Itoa(os.Getpid())+" (")) {
		t.Fatalf("own stat via dirfd = %q, %v", stat, err)
	}
	if _, err := ReadFileAt(dirfd, "no-such-file", nil, 4096); !errors.Is(err, ErrGone) || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("missing file = %v, want ErrGone wrapping ENOENT", err)
	}

	gone := reapedPID(t)
	for name, err := range map[string]error{
		"ReadFile":   func() error { _, err := f.ReadFile(gone, "status", nil, 1<<20); return err }(),
		"Readlink":   func() error { _, err := f.Readlink(gone, "exe"); return err }(),
		"Open":       func() error { _, err := f.Open(gone, "exe"); return err }(),
		"OpenPIDDir": func() error { _, err := f.OpenPIDDir(gone); return err }(),
	} {
		if !errors.Is(err, ErrGone) {
			t.Errorf("%s of a reaped pid: %v, want ErrGone", name, err)
		}
	}
}

// TestReadFileAtAfterReap: a held pid directory stops resolving once its
// process is reaped, whatever now holds the number.
func TestReadFileAtAfterReap(t *testing.T) {
	f, err := New("/proc")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot run a child: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	dirfd, err := f.OpenPIDDir(int32(cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dirfd)
	if _, err := ReadFileAt(dirfd, "stat", nil, 4096); err != nil {
		t.Fatalf("stat of a live child: %v", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := ReadFileAt(dirfd, "stat", nil, 4096); !errors.Is(err, ErrGone) {
		t.Fatalf("stat after reaping = %v, want ErrGone", err)
	}
}
