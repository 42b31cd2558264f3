// Package unix attests a Workload API caller from procfs: its pid, effective
// uid and gid, supplementary groups, the names of all of these, and, when
// enabled, the path and SHA-256 of the binary it runs.
//
// uid and gid are the effective ids, the ones the kernel checks access with
// and the ones SO_PEERCRED reports; SPIRE's unix attestor reports the same.
//
// Fields: unix.pid, unix.uid, unix.user, unix.gid, unix.group,
// unix.supplementary_gid (multi), unix.supplementary_group (multi),
// unix.path, unix.sha256. A name field is absent when the id has no entry in
// the passwd or group file. unix.path is the link target of
// /proc/<pid>/exe as the kernel renders it, which ends in " (deleted)" when
// the binary was removed or replaced after exec.
package unix

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	sysunix "golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
)

// Field names this attestor sets.
const (
	FieldPID                = "unix.pid"
	FieldUID                = "unix.uid"
	FieldUser               = "unix.user"
	FieldGID                = "unix.gid"
	FieldGroup              = "unix.group"
	FieldSupplementaryGID   = "unix.supplementary_gid"
	FieldSupplementaryGroup = "unix.supplementary_group"
	FieldPath               = "unix.path"
	FieldSHA256             = "unix.sha256"
)

// DefaultMaxBinarySize is the MaxBinarySize used when none is set.
const DefaultMaxBinarySize = 128 << 20

// maxStatusSize bounds a status read; 64Ki supplementary groups fit well within.
const maxStatusSize = 1 << 20

// Options configure an Attestor.
type Options struct {
	// ProcRoot is the procfs to read, default "/proc". Security-sensitive:
	// it must be the host's procfs as seen in the agent's PID namespace,
	// the namespace the peer pids come from; any other tree attests
	// whichever process happens to hold that pid there.
	ProcRoot string
	// PasswdFile and GroupFile name users and groups, default "/etc/passwd"
	// and "/etc/group". Use the host's files (as mounted into the agent),
	// not the agent image's.
	PasswdFile string
	GroupFile  string
	// WorkloadPath adds unix.path.
	WorkloadPath bool
	// WorkloadSHA256 adds unix.sha256, which means reading the binary
	// (once per binary version; results are cached).
	WorkloadSHA256 bool
	// MaxBinarySize: larger binaries get no unix.sha256 (logged once per
	// binary). Zero or negative means DefaultMaxBinarySize.
	MaxBinarySize int64
}

// Attestor attests processes by pid. It is safe for concurrent use.
type Attestor struct {
	procRoot   string
	withPath   bool
	withSHA256 bool
	maxBinary  int64

	users  nameFile
	groups nameFile

	digests digestCache
	bufs    sync.Pool // *[]byte for status reads

	tooLargeMu     sync.Mutex
	tooLargeLogged map[fileKey]struct{}
}

// New returns an Attestor for opts.
func New(opts Options) *Attestor {
	a := &Attestor{
		procRoot:   "/proc",
		withPath:   opts.WorkloadPath,
		withSHA256: opts.WorkloadSHA256,
		maxBinary:  opts.MaxBinarySize,
		users:      nameFile{path: "/etc/passwd"},
		groups:     nameFile{path: "/etc/group"},
	}
	if opts.ProcRoot != "" {
		a.procRoot = filepath.Clean(opts.ProcRoot)
	}
	if opts.PasswdFile != "" {
		a.users.path = opts.PasswdFile
	}
	if opts.GroupFile != "" {
		a.groups.path = opts.GroupFile
	}
	if a.maxBinary <= 0 {
		a.maxBinary = DefaultMaxBinarySize
	}
	a.bufs.New = func() any { b := make([]byte, 4096); return &b }
	return a
}

// Attest returns the unix.* attributes of process pid. A process that is gone
// (or a zombie), and pid 0 or below, give an error wrapping attestor.ErrDenied;
// other failures give plain errors. Attest does not itself guard against pid
// reuse: check the caller's process handle after it returns.
func (a *Attestor) Attest(ctx context.Context, pid int32) (attestor.Attributes, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("unix attestor: pid %d: %w", pid, attestor.ErrDenied)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	pidStr := strconv.FormatInt(int64(pid), 10)
	dir := a.procRoot + "/" + pidStr

	st, err := a.readStatus(dir)
	if err != nil {
		return nil, fmt.Errorf("unix attestor: pid %d: %w", pid, err)
	}
	if st.state == 'Z' || st.state == 'X' || st.state == 'x' {
		return nil, fmt.Errorf("unix attestor: pid %d: process is a zombie: %w", pid, attestor.ErrDenied)
	}

	users := a.users.snapshot()
	groups := a.groups.snapshot()

	attrs := make(attestor.Attributes, 9)
	attrs.Set(FieldPID, pidStr)
	attrs.Set(FieldUID, strconv.FormatUint(uint64(st.uid), 10))
	if name, ok := users[st.uid]; ok {
		attrs.Set(FieldUser, name)
	}
	attrs.Set(FieldGID, strconv.FormatUint(uint64(st.gid), 10))
	if name, ok := groups[st.gid]; ok {
		attrs.Set(FieldGroup, name)
	}
	if len(st.groups) > 0 {
		gids := make([]string, 0, len(st.groups))
		var names []string
		for _, g := range st.groups {
			gids = append(gids, strconv.FormatUint(uint64(g), 10))
			if name, ok := groups[g]; ok {
				names = append(names, name)
			}
		}
		attrs[FieldSupplementaryGID] = gids
		if len(names) > 0 {
			attrs[FieldSupplementaryGroup] = names
		}
	}

	if a.withPath {
		path, err := os.Readlink(dir + "/exe")
		if err != nil {
			return nil, fmt.Errorf("unix attestor: pid %d: binary path: %w", pid, goneOr(err))
		}
		attrs.Set(FieldPath, path)
	}
	if a.withSHA256 {
		sum, err := a.binarySHA256(ctx, dir)
		if err != nil {
			return nil, fmt.Errorf("unix attestor: pid %d: binary sha256: %w", pid, err)
		}
		if sum != "" {
			attrs.Set(FieldSHA256, sum)
		}
	}
	return attrs, nil
}

// goneOr maps "no such process" errors to attestor.ErrDenied.
func goneOr(err error) error {
	if errors.Is(err, sysunix.ENOENT) || errors.Is(err, sysunix.ESRCH) {
		return fmt.Errorf("process is gone (%v): %w", err, attestor.ErrDenied)
	}
	return err
}

func (a *Attestor) readStatus(dir string) (procStatus, error) {
	fd, err := sysunix.Open(dir+"/status", sysunix.O_RDONLY|sysunix.O_CLOEXEC, 0)
	if err != nil {
		return procStatus{}, fmt.Errorf("open status: %w", goneOr(err))
	}
	defer sysunix.Close(fd)

	bp := a.bufs.Get().(*[]byte)
	defer a.bufs.Put(bp)
	buf := (*bp)[:cap(*bp)]
	n := 0
	for {
		if n == len(buf) {
			if len(buf) >= maxStatusSize {
				return procStatus{}, fmt.Errorf("status larger than %d bytes", maxStatusSize)
			}
			grown := make([]byte, 2*len(buf))
			copy(grown, buf[:n])
			buf = grown
			*bp = buf
		}
		m, err := sysunix.Read(fd, buf[n:])
		if err == sysunix.EINTR {
			continue
		}
		if err != nil {
			// ESRCH: the process exited between open and read.
			return procStatus{}, fmt.Errorf("read status: %w", goneOr(err))
		}
		if m == 0 {
			break
		}
		n += m
	}
	return parseStatus(buf[:n])
}

// binarySHA256 returns the hex SHA-256 of the process's binary, or "" when
// it is over the size limit. It opens /proc/<pid>/exe, which reaches the
// exact file that was executed whatever the workload's mount namespace.
func (a *Attestor) binarySHA256(ctx context.Context, dir string) (string, error) {
	fd, err := sysunix.Open(dir+"/exe", sysunix.O_RDONLY|sysunix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open binary: %w", goneOr(err))
	}
	defer sysunix.Close(fd)
	var st sysunix.Stat_t
	if err := sysunix.Fstat(fd, &st); err != nil {
		return "", fmt.Errorf("stat binary: %w", err)
	}
	if st.Mode&sysunix.S_IFMT != sysunix.S_IFREG {
		return "", fmt.Errorf("binary is not a regular file (mode %#o)", st.Mode)
	}
	key := keyOf(&st)
	if key.size > a.maxBinary {
		a.logTooLarge(key, dir)
		return "", nil
	}
	sum, err := a.digests.get(ctx, key, func() (string, error) {
		return hashFile(ctx, fd, key, a.maxBinary)
	})
	if errors.Is(err, errTooLarge) {
		a.logTooLarge(key, dir)
		return "", nil
	}
	return sum, err
}

func (a *Attestor) logTooLarge(key fileKey, dir string) {
	a.tooLargeMu.Lock()
	_, seen := a.tooLargeLogged[key]
	if !seen {
		if a.tooLargeLogged == nil || len(a.tooLargeLogged) >= maxDigests {
			a.tooLargeLogged = make(map[fileKey]struct{})
		}
		a.tooLargeLogged[key] = struct{}{}
	}
	a.tooLargeMu.Unlock()
	if !seen {
		klog.InfoS("Workload binary over the size limit; unix.sha256 left out",
			"exe", dir+"/exe", "size", key.size, "limit", a.maxBinary)
	}
}
