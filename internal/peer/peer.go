// Package peer identifies the process on the other end of a Unix socket: its
// SO_PEERCRED credentials plus a handle on the process taken at accept, so a
// caller can later check that the pid it attested still belongs to the process
// that connected and not to a newcomer that reused the number.
//
// The package is Linux only.
package peer

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	sysunix "golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/internal/procfs"
)

var (
	// ErrProcessGone: the process that connected has exited (or is a zombie),
	// or its handle was released. Whatever was attested for its pid may now
	// describe another process; deny.
	ErrProcessGone = errors.New("peer process is gone")
	// ErrOutsidePIDNamespace: SO_PEERCRED reported pid 0, so the caller lives
	// in a PID namespace the agent cannot see into and cannot be attested; deny.
	ErrOutsidePIDNamespace = errors.New("peer is outside the agent's PID namespace")
)

// Info is who connected: pid, effective uid and gid as of connect(), and a
// handle on that very process.
//
// PID is only meaningful in the agent's PID namespace. A PID of 0 means the
// caller is outside it; callers must deny such a peer (Alive reports
// ErrOutsidePIDNamespace for it).
type Info struct {
	PID int32
	UID uint32
	GID uint32

	h *handle
	// closeConn drops the connection; set by Credentials' handshake.
	closeConn func() error
	// slot counts the connection against the Limits.
	slot *slot
}

// revokeGrace is how long a revoked connection stays open: long enough for
// the refusal to reach the client, so it sees the reason and not an EOF.
const revokeGrace = 500 * time.Millisecond

// Revoke ends the connection for good: Revoked reports why from now on, so
// every later call on it can be refused before any work, and the
// connection is closed shortly after. For a caller whose process is gone or
// changed credentials: whoever still holds the socket is not who connected.
func (i Info) Revoke(reason string) {
	if i.slot == nil {
		_ = i.CloseConnection()
		return
	}
	if i.slot.revoked.CompareAndSwap(nil, &reason) {
		time.AfterFunc(revokeGrace, func() { _ = i.CloseConnection() })
	}
}

// Revoked returns the reason the connection was revoked, if it was.
func (i Info) Revoked() (string, bool) {
	if i.slot == nil {
		return "", false
	}
	if r := i.slot.revoked.Load(); r != nil {
		return *r, true
	}
	return "", false
}

// MarkEntitled records that the caller was served an identity: its
// connection no longer counts against Limits.Unproven.
func (i Info) MarkEntitled() { i.slot.prove() }

// CloseConnection drops the caller's connection, for a caller that must not
// keep talking (its process is gone and the pid may name another). A no-op
// for an Info not made by Credentials.
func (i Info) CloseConnection() error {
	if i.closeConn == nil {
		return nil
	}
	return i.closeConn()
}

// Alive returns nil when the process that connected still runs (has not
// exited and is not a zombie) and the pid still names it. Call it after
// attesting the pid: if it returns nil, the attestation described the caller.
// Otherwise the error wraps ErrProcessGone or ErrOutsidePIDNamespace.
func (i Info) Alive() error {
	if i.PID == 0 {
		return ErrOutsidePIDNamespace
	}
	if i.h == nil {
		return fmt.Errorf("peer pid %d: no process handle: %w", i.PID, ErrProcessGone)
	}
	if err := i.h.alive(); err != nil {
		return fmt.Errorf("peer pid %d: %w", i.PID, err)
	}
	return nil
}

// Close releases the process handle. Infos from Credentials are released
// when their connection closes. After Close, Alive reports ErrProcessGone.
func (i Info) Close() error {
	if i.h == nil {
		return nil
	}
	return i.h.close()
}

// handleKind is how a process handle pins its process.
type handleKind int

const (
	// handleAuto picks the best kind the kernel offers. Only a request.
	handleAuto handleKind = iota
	// handlePeerPidfd: SO_PEERPIDFD (Linux 6.5+), a pidfd the kernel took
	// at connect(); no window for pid reuse at all.
	handlePeerPidfd
	// handlePidfdOpen: pidfd_open(pid) at accept (Linux 5.3+).
	handlePidfdOpen
	// handleProcDir: an open /proc/<pid> directory plus the start time.
	handleProcDir
)

func (k handleKind) String() string {
	switch k {
	case handleAuto:
		return "auto"
	case handlePeerPidfd:
		return "peer-pidfd"
	case handlePidfdOpen:
		return "pidfd-open"
	case handleProcDir:
		return "proc-dir"
	}
	return "handleKind(" + strconv.Itoa(int(k)) + ")"
}

// handle pins the peer process. The fd lives in an *os.File so that a Close
// racing with Alive can never leave Alive polling a reused descriptor number.
type handle struct {
	kind  handleKind
	f     *os.File
	start uint64 // handleProcDir: start time (clock ticks since boot)
}

func (h *handle) close() error { return h.f.Close() }

// alive reports nil while the process runs, else an error wrapping ErrProcessGone.
func (h *handle) alive() error {
	rc, err := h.f.SyscallConn()
	if err != nil {
		return fmt.Errorf("process handle: %v: %w", err, ErrProcessGone)
	}
	var aerr error
	if err := rc.Control(func(fd uintptr) {
		if h.kind == handleProcDir {
			aerr = procDirAlive(int(fd), h.start)
		} else {
			aerr = pidfdAlive(int(fd))
		}
	}); err != nil {
		// Released handle: fail closed.
		return fmt.Errorf("process handle: %v: %w", err, ErrProcessGone)
	}
	return aerr
}

// pidfdAlive polls the pidfd without waiting; a pidfd turns readable once the
// process has exited, zombie or reaped.
func pidfdAlive(fd int) error {
	fds := []sysunix.PollFd{{Fd: int32(fd), Events: sysunix.POLLIN}}
	for {
		n, err := sysunix.Poll(fds, 0)
		if err == sysunix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll pidfd: %v: %w", err, ErrProcessGone)
		}
		if n > 0 && fds[0].Revents != 0 {
			return fmt.Errorf("process exited: %w", ErrProcessGone)
		}
		return nil
	}
}

// procDirAlive re-reads stat through the held /proc/<pid> directory. Once its
// process is reaped the directory no longer resolves, even if the pid number
// was reused; the start time guards the rest.
func procDirAlive(dirfd int, start uint64) error {
	state, got, err := readStat(dirfd)
	if err != nil {
		return fmt.Errorf("%v: %w", err, ErrProcessGone)
	}
	if got != start {
		return fmt.Errorf("start time changed from %d to %d: %w", start, got, ErrProcessGone)
	}
	if state == 'Z' || state == 'X' || state == 'x' {
		return fmt.Errorf("process state %c: %w", state, ErrProcessGone)
	}
	return nil
}

// fromConn reads SO_PEERCRED and takes a handle of the requested kind,
// falling back to the next kind only where the kernel lacks the feature.
func fromConn(c syscall.Conn, kind handleKind) (Info, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Info{}, fmt.Errorf("peer credentials: %w", err)
	}
	var (
		info Info
		herr error
	)
	if err := rc.Control(func(fd uintptr) {
		info, herr = credentialsOf(int(fd), kind)
	}); err != nil {
		return Info{}, fmt.Errorf("peer credentials: %w", err)
	}
	if herr != nil {
		return Info{}, herr
	}
	return info, nil
}

func credentialsOf(sockfd int, kind handleKind) (Info, error) {
	cred, err := sysunix.GetsockoptUcred(sockfd, sysunix.SOL_SOCKET, sysunix.SO_PEERCRED)
	if err != nil {
		return Info{}, fmt.Errorf("peer credentials: SO_PEERCRED: %w", err)
	}
	info := Info{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}

	if kind == handleAuto || kind == handlePeerPidfd {
		pidfd, err := sysunix.GetsockoptInt(sockfd, sysunix.SOL_SOCKET, sysunix.SO_PEERPIDFD)
		switch {
		case err == nil:
			info.h = &handle{kind: handlePeerPidfd, f: os.NewFile(uintptr(pidfd), "pidfd")}
			return info, nil
		case err == sysunix.ENOPROTOOPT && kind == handleAuto:
			// Kernel before 6.5: fall through.
		case err == sysunix.ESRCH || err == sysunix.EINVAL:
			// The peer is already reaped (EINVAL on 6.5-6.8). Opening by
			// pid now could pin a newcomer, so do not fall back.
			return Info{}, fmt.Errorf("peer pid %d: SO_PEERPIDFD: %v: %w", info.PID, err, ErrProcessGone)
		default:
			return Info{}, fmt.Errorf("peer pid %d: SO_PEERPIDFD: %w", info.PID, err)
		}
	}
	if info.PID == 0 {
		// Nothing to open by number; Alive denies it anyway.
		return info, nil
	}
	if kind == handleAuto || kind == handlePidfdOpen {
		pidfd, err := sysunix.PidfdOpen(int(info.PID), 0)
		switch {
		case err == nil:
			info.h = &handle{kind: handlePidfdOpen, f: os.NewFile(uintptr(pidfd), "pidfd")}
			return info, nil
		case err == sysunix.ENOSYS && kind == handleAuto:
			// Kernel before 5.3: fall through.
		case err == sysunix.ESRCH || err == sysunix.EINVAL:
			// EINVAL: the number now names a thread, so it was reused.
			return Info{}, fmt.Errorf("peer pid %d: pidfd_open: %v: %w", info.PID, err, ErrProcessGone)
		default:
			return Info{}, fmt.Errorf("peer pid %d: pidfd_open: %w", info.PID, err)
		}
	}
	h, err := openProcDir(info.PID)
	if err != nil {
		return Info{}, fmt.Errorf("peer pid %d: %w", info.PID, err)
	}
	info.h = h
	return info, nil
}

// ownProc is the agent's own procfs: SO_PEERCRED pids are in the agent's PID
// namespace, so no other tree is right for them.
const ownProc = "/proc"

// maxStatSize bounds a stat read: a stat line is well under 1 KiB; 4 KiB
// leaves room for long kthread names.
const maxStatSize = 4096

// openProcDir is the fallback for kernels without pidfds.
func openProcDir(pid int32) (*handle, error) {
	proc, err := procfs.New(ownProc)
	if err != nil {
		return nil, err
	}
	dirfd, err := proc.OpenPIDDir(pid)
	if err != nil {
		if errors.Is(err, procfs.ErrGone) {
			return nil, fmt.Errorf("%w: %w", err, ErrProcessGone)
		}
		return nil, err
	}
	state, start, err := readStat(dirfd)
	if err == nil && (state == 'Z' || state == 'X' || state == 'x') {
		err = fmt.Errorf("process state %c: %w", state, ErrProcessGone)
	}
	if err != nil {
		sysunix.Close(dirfd)
		if !errors.Is(err, ErrProcessGone) {
			err = fmt.Errorf("%w: %w", err, ErrProcessGone)
		}
		return nil, err
	}
	return &handle{kind: handleProcDir, f: os.NewFile(uintptr(dirfd), proc.Path(pid, "")), start: start}, nil
}

// readStat reads <dirfd>/stat and returns its state and start time.
func readStat(dirfd int) (byte, uint64, error) {
	var buf [maxStatSize]byte
	b, err := procfs.ReadFileAt(dirfd, "stat", buf[:0], maxStatSize)
	if err != nil {
		return 0, 0, err
	}
	return parseStat(b)
}

// parseStat extracts field 3 (state) and field 22 (starttime) of a
// /proc/<pid>/stat line. Field 2 is the command name in parentheses and may
// hold spaces and ')' of its own, so fields are counted from the last ')'.
func parseStat(b []byte) (state byte, start uint64, err error) {
	end := -1
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ')' {
			end = i
			break
		}
	}
	if end < 0 {
		return 0, 0, errors.New("malformed stat: no command name")
	}
	rest := b[end+1:]
	// Fields after the command name start at field 3.
	field := 2
	i := 0
	for {
		for i < len(rest) && rest[i] == ' ' {
			i++
		}
		if i >= len(rest) || rest[i] == '\n' {
			break
		}
		j := i
		for j < len(rest) && rest[j] != ' ' && rest[j] != '\n' {
			j++
		}
		field++
		tok := rest[i:j]
		switch field {
		case 3:
			if len(tok) != 1 {
				return 0, 0, fmt.Errorf("malformed stat: state %q", tok)
			}
			state = tok[0]
		case 22:
			v, perr := strconv.ParseUint(string(tok), 10, 64)
			if perr != nil {
				return 0, 0, fmt.Errorf("malformed stat: start time %q", tok)
			}
			return state, v, nil
		}
		i = j
	}
	return 0, 0, fmt.Errorf("malformed stat: %d fields", field)
}
