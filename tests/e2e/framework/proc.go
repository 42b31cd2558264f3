package framework

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ProcRecord identifies a process we started beyond PID reuse: its start time
// (field 22 of /proc/<pid>/stat) must still match before we signal it.
type ProcRecord struct {
	PID       int      `json:"pid"`
	StartTime uint64   `json:"startTime"`
	Args      []string `json:"args"`
}

type proc struct {
	rec  ProcRecord
	done chan struct{}
}

func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name in field 2 may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("pid %d: malformed stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("pid %d: short stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// alive reports whether the recorded process still exists as the same process.
func (r ProcRecord) alive() bool {
	if r.PID <= 0 {
		return false
	}
	st, err := startTime(r.PID)
	return err == nil && st == r.StartTime
}

func startProc(args []string, logPath string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a ^C on the terminal reaches the test, which
	// then tears the node down in order, not every component at once.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	st, err := startTime(cmd.Process.Pid)
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	p := &proc{rec: ProcRecord{PID: cmd.Process.Pid, StartTime: st, Args: args}, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

// stopRecord ends a recorded process: SIGTERM, then SIGKILL after grace.
// It works for processes of an earlier run too (not our children), by polling.
func stopRecord(r ProcRecord, grace time.Duration) error {
	if !r.alive() {
		return nil
	}
	_ = syscall.Kill(r.PID, syscall.SIGTERM)
	if waitGone(r, grace) {
		return nil
	}
	_ = syscall.Kill(r.PID, syscall.SIGKILL)
	if waitGone(r, 10*time.Second) {
		return nil
	}
	return errors.New("process " + strconv.Itoa(r.PID) + " survived SIGKILL")
}

func waitGone(r ProcRecord, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !r.alive() {
			return true
		}
		// A child of ours is a zombie until reaped; the reaper goroutine does it.
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.PID)); err == nil && isZombie(string(st)) {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return !r.alive()
}

func isZombie(stat string) bool {
	i := strings.LastIndexByte(stat, ')')
	return i >= 0 && len(stat) > i+2 && stat[i+2] == 'Z'
}

// procSet starts and stops the processes of one base directory, recording
// each in the base's state file before it runs, so that Cleanup (of this run
// or a later one) stops them by PID even when the test binary died.
type procSet struct {
	base, logs string
	st         *state
	running    map[string]*proc
}

func (s *procSet) logPath(name string) string { return filepath.Join(s.logs, name+".log") }

func (s *procSet) start(name string, args ...string) error {
	if _, ok := s.st.Procs[name]; ok {
		return fmt.Errorf("start %s: already running", name)
	}
	p, err := startProc(args, s.logPath(name))
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	s.running[name] = p
	s.st.Procs[name] = p.rec
	return s.st.save(s.base)
}

// stop sends SIGTERM and, after grace, SIGKILL; a zero grace kills at once.
func (s *procSet) stop(name string, grace time.Duration) error {
	rec, ok := s.st.Procs[name]
	if !ok {
		return nil
	}
	if p := s.running[name]; p != nil {
		select {
		case <-p.done:
		default:
			if grace > 0 {
				_ = syscall.Kill(rec.PID, syscall.SIGTERM)
			}
			select {
			case <-p.done:
			case <-time.After(grace):
				_ = syscall.Kill(rec.PID, syscall.SIGKILL)
				<-p.done
			}
		}
	} else if err := stopRecord(rec, grace); err != nil {
		return err
	}
	delete(s.running, name)
	delete(s.st.Procs, name)
	return s.st.save(s.base)
}

// exited returns an error when a process died while we wait on it.
func (s *procSet) exited(name string) error {
	if p := s.running[name]; p != nil {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited; see %s", name, s.logPath(name))
		default:
		}
	}
	return nil
}
