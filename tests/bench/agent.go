package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// benchGID is the group the stream clients run as; the bench config issues
// every process of that group (and root, the bench itself) the identity
// spiffe://<td>/bench/uid/<its uid>.
const benchGID = 4242

const benchConfig = `svids:
- spiffeID: /bench/uid/{unix.uid}
  rules:
  - match: {unix.gid: "4242"}
  - match: {unix.uid: "0"}
`

// agent is a csi-agent process serving a Unix socket in its own temp dir.
type agent struct {
	cmd  *exec.Cmd
	pid  int
	dir  string
	sock string
	log  string
}

// startAgent runs bin in --dev mode in a fresh world-traversable temp dir;
// withConfig adds the bench rules; extra flags follow.
func startAgent(bin string, withConfig bool, extra ...string) (*agent, error) {
	dir, err := os.MkdirTemp("", "csi-agent-bench-")
	if err != nil {
		return nil, err
	}
	// Clients run under other uids and must reach the socket inside.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	a := &agent{dir: dir, sock: filepath.Join(dir, "sockets", "agent.sock"), log: filepath.Join(dir, "agent.log")}
	args := []string{"run", "--dev", "--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", filepath.Join(dir, "sockets"),
		"-v=0", "--logtostderr=false", "--log_file", a.log}
	if withConfig {
		cfg := filepath.Join(dir, "config.yaml")
		if err := os.WriteFile(cfg, []byte(benchConfig), 0o644); err != nil {
			return nil, err
		}
		args = append(args, "--config", cfg)
	}
	if err := a.run(exec.Command(bin, append(args, extra...)...)); err != nil {
		return nil, err
	}
	return a, nil
}

// run starts cmd as a's process and waits for it to serve a.sock.
func (a *agent) run(cmd *exec.Cmd) error {
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	a.cmd = cmd
	if err := cmd.Start(); err != nil {
		os.RemoveAll(a.dir)
		return err
	}
	a.pid = cmd.Process.Pid
	if err := waitForSocket(a.sock, 20*time.Second); err != nil {
		a.stop()
		return fmt.Errorf("%w: %s", err, stderr.String())
	}
	return nil
}

func (a *agent) stop() {
	_ = a.cmd.Process.Kill()
	_ = a.cmd.Wait()
	os.RemoveAll(a.dir)
}

func waitForSocket(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("agent socket %s did not appear", path)
}

// raiseFileLimit lifts RLIMIT_NOFILE for this process and the agents and
// clients it starts to its hard limit, and returns that: every stream
// connection is a socket in the agent, plus a pidfd.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("raise RLIMIT_NOFILE: %w", err)
	}
	return lim.Max, nil
}

// procSample is what /proc tells of a process at one moment.
type procSample struct {
	at       time.Time
	cpu      time.Duration // utime + stime
	syscr    int64         // read syscalls so far
	rchar    int64         // bytes read so far, by any read syscall
	rss, hwm int64         // KiB
	threads  int64
}

// clockTick is USER_HZ, 100 on every Linux ABI Go supports.
const clockTick = 10 * time.Millisecond

func sampleProc(pid int) (procSample, error) {
	s := procSample{at: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// Fields after the command name, which may hold spaces: state is
	// field 3, utime 14, stime 15.
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(f) < 13 {
		return s, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	s.cpu = time.Duration(ut+st) * clockTick
	if err := scanKV(fmt.Sprintf("/proc/%d/io", pid), map[string]*int64{"syscr:": &s.syscr, "rchar:": &s.rchar}); err != nil {
		return s, err
	}
	err = scanKV(fmt.Sprintf("/proc/%d/status", pid), map[string]*int64{"VmRSS:": &s.rss, "VmHWM:": &s.hwm, "Threads:": &s.threads})
	return s, err
}

func scanKV(path string, want map[string]*int64) error {
	fh, err := os.Open(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 {
			if p, ok := want[f[0]]; ok {
				*p, _ = strconv.ParseInt(f[1], 10, 64)
			}
		}
	}
	return sc.Err()
}

func rssKiB(pid int) int64 {
	s, err := sampleProc(pid)
	if err != nil {
		return -1
	}
	return s.rss
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }
