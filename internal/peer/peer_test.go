package peer

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	sysunix "golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// The test binary doubles as the peer process: re-executed with helperEnv set
// it runs a helper instead of the tests.
const (
	helperEnv = "PEER_TEST_HELPER"
	socketEnv = "PEER_TEST_SOCKET"
)

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "connect":
		os.Exit(helperConnect(os.Getenv(socketEnv)))
	case "serve":
		os.Exit(helperServe(os.Getenv(socketEnv)))
	default:
		fmt.Fprintln(os.Stderr, "unknown helper")
		os.Exit(2)
	}
}

// helperConnect connects to the socket and stays alive until stdin closes.
func helperConnect(path string) int {
	c, err := net.Dial("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// helperServe accepts one connection and reports what it learnt of the peer.
func helperServe(path string) int {
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer l.Close()
	fmt.Println("listening")
	c, err := l.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	info, err := fromConn(c.(*net.UnixConn), handleAuto)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer info.Close()
	fmt.Printf("pid=%d outside=%v\n", info.PID, errors.Is(info.Alive(), ErrOutsidePIDNamespace))
	return 0
}

var allKinds = []handleKind{handlePeerPidfd, handlePidfdOpen, handleProcDir}

type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	conn  *net.UnixConn
}

// exit lets the child finish without reaping it, leaving a zombie.
func (c *child) exit(t *testing.T) {
	t.Helper()
	c.stdin.Close()
	var si sysunix.Siginfo
	for {
		err := sysunix.Waitid(sysunix.P_PID, c.cmd.Process.Pid, &si, sysunix.WEXITED|sysunix.WNOWAIT, nil)
		if err == sysunix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("waitid: %v", err)
		}
		return
	}
}

// startChild runs exe in helper mode "connect" and returns the server side of
// its connection.
func startChild(t *testing.T, exe string, l *net.UnixListener, cred *syscall.Credential) *child {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), helperEnv+"=connect", socketEnv+"="+l.Addr().String())
	cmd.Stderr = os.Stderr
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	l.SetDeadline(time.Now().Add(20 * time.Second))
	c, err := l.AcceptUnix()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &child{cmd: cmd, stdin: stdin, conn: c}
}

// listen opens a Unix listener in dir that any user may connect to.
func listen(t *testing.T, dir string) *net.UnixListener {
	t.Helper()
	path := filepath.Join(dir, "s.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	return l
}

func testExe(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

func TestFromConnChildLifecycle(t *testing.T) {
	for _, kind := range allKinds {
		t.Run(kind.String(), func(t *testing.T) {
			l := listen(t, t.TempDir())
			c := startChild(t, testExe(t), l, nil)

			info, err := fromConn(c.conn, kind)
			if err != nil {
				t.Fatalf("fromConn: %v", err)
			}
			t.Cleanup(func() { info.Close() })
			if info.h == nil || info.h.kind != kind {
				t.Fatalf("handle %+v, want kind %v", info.h, kind)
			}
			if got, want := int(info.PID), c.cmd.Process.Pid; got != want {
				t.Errorf("PID = %d, want %d", got, want)
			}
			if info.UID != uint32(os.Geteuid()) || info.GID != uint32(os.Getegid()) {
				t.Errorf("UID/GID = %d/%d, want %d/%d", info.UID, info.GID, os.Geteuid(), os.Getegid())
			}
			if err := info.Alive(); err != nil {
				t.Fatalf("Alive while running: %v", err)
			}

			c.exit(t)
			if err := info.Alive(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("Alive of zombie = %v, want ErrProcessGone", err)
			}
			assertState(t, c.cmd.Process.Pid, 'Z')

			if err := c.cmd.Wait(); err != nil {
				t.Fatalf("child: %v", err)
			}
			if err := info.Alive(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("Alive after reaping = %v, want ErrProcessGone", err)
			}
		})
	}
}

func assertState(t *testing.T, pid int, want byte) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	state, _, err := parseStat(b)
	if err != nil {
		t.Fatal(err)
	}
	if state != want {
		t.Fatalf("pid %d state %c, want %c", pid, state, want)
	}
}

func TestFromConnAfterPeerReaped(t *testing.T) {
	// The peer is gone before the handshake: no handle may be taken by pid.
	for _, kind := range allKinds {
		t.Run(kind.String(), func(t *testing.T) {
			l := listen(t, t.TempDir())
			c := startChild(t, testExe(t), l, nil)
			c.stdin.Close()
			if err := c.cmd.Wait(); err != nil {
				t.Fatal(err)
			}
			info, err := fromConn(c.conn, kind)
			if err == nil {
				// Newer kernels hand out pidfds of reaped peers; such a
				// handle must report the process gone.
				defer info.Close()
				err = info.Alive()
				t.Logf("handshake took a %v handle; Alive: %v", info.h.kind, err)
			} else {
				t.Logf("handshake: %v", err)
			}
			if !errors.Is(err, ErrProcessGone) {
				t.Fatalf("err = %v, want ErrProcessGone", err)
			}
		})
	}
}

func TestFromConnSelf(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	info, err := fromConn(conns[0], handleAuto)
	if err != nil {
		t.Fatal(err)
	}
	if int(info.PID) != os.Getpid() || info.UID != uint32(os.Geteuid()) || info.GID != uint32(os.Getegid()) {
		t.Errorf("Info = %+v, want pid %d uid %d gid %d", info, os.Getpid(), os.Geteuid(), os.Getegid())
	}
	if info.h.kind != handlePeerPidfd {
		t.Errorf("auto picked %v on a kernel with SO_PEERPIDFD", info.h.kind)
	}
	if err := info.Alive(); err != nil {
		t.Fatalf("Alive: %v", err)
	}
	if err := info.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := info.Alive(); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("Alive after Close = %v, want ErrProcessGone", err)
	}
}

func TestZeroInfoIsNotAlive(t *testing.T) {
	if err := (Info{PID: 42}).Alive(); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("Alive without handle = %v, want ErrProcessGone", err)
	}
	if err := (Info{}).Alive(); !errors.Is(err, ErrOutsidePIDNamespace) {
		t.Fatalf("Alive of pid 0 = %v, want ErrOutsidePIDNamespace", err)
	}
}

// TestFromConnOtherUser: the credentials are the peer's, not ours.
func TestFromConnOtherUser(t *testing.T) {
	testutil.RequireRoot(t)
	// uid 65534 must be able to reach both the binary and the socket.
	dir := testutil.PublicTempDir(t, "peer-test-")
	exe := testutil.CopyTestBinary(t, dir, "peer.test")

	for _, kind := range allKinds {
		t.Run(kind.String(), func(t *testing.T) {
			l := listen(t, dir)
			c := startChild(t, exe, l, &syscall.Credential{Uid: 65534, Gid: 65534})
			info, err := fromConn(c.conn, kind)
			if err != nil {
				t.Fatal(err)
			}
			defer info.Close()
			if info.UID != 65534 || info.GID != 65534 {
				t.Errorf("UID/GID = %d/%d, want 65534/65534", info.UID, info.GID)
			}
			if int(info.PID) != c.cmd.Process.Pid {
				t.Errorf("PID = %d, want %d", info.PID, c.cmd.Process.Pid)
			}
			if err := info.Alive(); err != nil {
				t.Fatalf("Alive: %v", err)
			}
			c.exit(t)
			if err := info.Alive(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("Alive after exit = %v", err)
			}
		})
	}
}

// TestFromConnOutsidePIDNamespace: an agent in a child PID namespace sees a
// caller from the parent namespace as pid 0 and must refuse it.
func TestFromConnOutsidePIDNamespace(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	cmd := exec.Command(testExe(t))
	cmd.Env = append(os.Environ(), helperEnv+"=serve", socketEnv+"="+path)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(out)
	if line, err := r.ReadString('\n'); err != nil || line != "listening\n" {
		t.Fatalf("helper: %q %v", line, err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	if got, want := strings.TrimSpace(line), "pid=0 outside=true"; got != want {
		t.Fatalf("helper saw %q, want %q", got, want)
	}
}

func BenchmarkFromConn(b *testing.B) {
	for _, kind := range allKinds {
		b.Run(kind.String(), func(b *testing.B) {
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer syscall.Close(fds[1])
			f := os.NewFile(uintptr(fds[0]), "socketpair")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			uc := c.(*net.UnixConn)
			b.ReportAllocs()
			for b.Loop() {
				info, err := fromConn(uc, kind)
				if err != nil {
					b.Fatal(err)
				}
				info.Close()
			}
		})
	}
}

func BenchmarkAlive(b *testing.B) {
	for _, kind := range allKinds {
		b.Run(kind.String(), func(b *testing.B) {
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer syscall.Close(fds[1])
			f := os.NewFile(uintptr(fds[0]), "socketpair")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			info, err := fromConn(c.(*net.UnixConn), kind)
			if err != nil {
				b.Fatal(err)
			}
			defer info.Close()
			b.ReportAllocs()
			for b.Loop() {
				if err := info.Alive(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
