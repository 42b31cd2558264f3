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
	"github.com/csi-agent/csi-agent/attestor/field"
	"path/filepath"
	"strconv"
	"sync"

	sysunix "golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/procfs"
)

// maxStatusSize bounds a status read; 64Ki supplementary groups fit well within.
const maxStatusSize = 1 << 20

// Options configure an Attestor; internal/config owns their defaults.
type Options struct {
	// ProcRoot is the procfs to read (required). Security-sensitive:
	// it must be the host's procfs as seen in the agent's PID namespace,
	// the namespace the peer pids come from; any other tree attests
	// whichever process happens to hold that pid there.
	ProcRoot string
	// PasswdFile and GroupFile name users and groups (required). Use the
	// host's files (as mounted into the agent), not the agent image's.
	PasswdFile string
	GroupFile  string
	// WorkloadPath adds unix.path.
	WorkloadPath bool
	// WorkloadSHA256 adds unix.sha256, which means reading the binary
	// (once per binary version; results are cached).
	WorkloadSHA256 bool
	// MaxBinarySize: larger binaries get no unix.sha256 (logged once per
	// binary). Required with WorkloadSHA256.
	MaxBinarySize int64
}

// Attestor attests processes by pid. It is safe for concurrent use.
type Attestor struct {
	proc       *procfs.FS
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
func New(opts Options) (*Attestor, error) {
	switch {
	case !filepath.IsAbs(opts.ProcRoot):
		return nil, fmt.Errorf("unix attestor: proc root %q is not an absolute path", opts.ProcRoot)
	case opts.PasswdFile == "":
		return nil, errors.New("unix attestor: passwd file is required")
	case opts.GroupFile == "":
		return nil, errors.New("unix attestor: group file is required")
	case opts.WorkloadSHA256 && opts.MaxBinarySize <= 0:
		return nil, fmt.Errorf("unix attestor: max binary size %d is not positive", opts.MaxBinarySize)
	}
	proc, err := procfs.New(opts.ProcRoot)
	if err != nil {
		return nil, fmt.Errorf("unix attestor: %w", err)
	}
	a := &Attestor{
		proc:       proc,
		withPath:   opts.WorkloadPath,
		withSHA256: opts.WorkloadSHA256,
		maxBinary:  opts.MaxBinarySize,
		users:      nameFile{path: opts.PasswdFile},
		groups:     nameFile{path: opts.GroupFile},
	}
	a.bufs.New = func() any { b := make([]byte, 4096); return &b }
	return a, nil
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

	st, err := a.readStatus(pid)
	if err != nil {
		return nil, fmt.Errorf("unix attestor: pid %d: %w", pid, err)
	}
	if st.state == 'Z' || st.state == 'X' || st.state == 'x' {
		return nil, fmt.Errorf("unix attestor: pid %d: process is a zombie: %w", pid, attestor.ErrDenied)
	}

	users := a.users.snapshot()
	groups := a.groups.snapshot()

	attrs := make(attestor.Attributes, 9)
	attrs.Set(field.UnixPID, pidStr)
	attrs.Set(field.UnixUID, strconv.FormatUint(uint64(st.uid), 10))
	if name, ok := users[st.uid]; ok {
		attrs.Set(field.UnixUser, name)
	}
	attrs.Set(field.UnixGID, strconv.FormatUint(uint64(st.gid), 10))
	if name, ok := groups[st.gid]; ok {
		attrs.Set(field.UnixGroup, name)
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
		attrs[field.UnixSupplementaryGID] = gids
		if len(names) > 0 {
			attrs[field.UnixSupplementaryGroup] = names
		}
	}

	if a.withPath {
		path, err := a.proc.Readlink(pid, "exe")
		if err != nil {
			return nil, fmt.Errorf("unix attestor: pid %d: binary path: %w", pid, goneOr(err))
		}
		attrs.Set(field.UnixPath, path)
	}
	if a.withSHA256 {
		sum, err := a.binarySHA256(ctx, pid)
		if err != nil {
			return nil, fmt.Errorf("unix attestor: pid %d: binary sha256: %w", pid, err)
		}
		if sum != "" {
			attrs.Set(field.UnixSHA256, sum)
		}
	}
	return attrs, nil
}

// goneOr maps "no such process" errors to attestor.ErrDenied.
func goneOr(err error) error {
	if errors.Is(err, procfs.ErrGone) {
		return fmt.Errorf("%w: %w", err, attestor.ErrDenied)
	}
	return err
}

func (a *Attestor) readStatus(pid int32) (procStatus, error) {
	bp := a.bufs.Get().(*[]byte)
	defer a.bufs.Put(bp)
	b, err := a.proc.ReadFile(pid, "status", *bp, maxStatusSize)
	if err != nil {
		return procStatus{}, goneOr(err)
	}
	if cap(b) > cap(*bp) {
		*bp = b
	}
	return parseStatus(b)
}

// binarySHA256 returns the hex SHA-256 of the process's binary, or "" when
// it is over the size limit. It opens /proc/<pid>/exe, which reaches the
// exact file that was executed whatever the workload's mount namespace.
func (a *Attestor) binarySHA256(ctx context.Context, pid int32) (string, error) {
	fd, err := a.proc.Open(pid, "exe")
	if err != nil {
		return "", goneOr(err)
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
		a.logTooLarge(key, pid)
		return "", nil
	}
	sum, err := a.digests.get(ctx, key, func() (string, error) {
		return hashFile(ctx, fd, key, a.maxBinary)
	})
	if errors.Is(err, errTooLarge) {
		a.logTooLarge(key, pid)
		return "", nil
	}
	return sum, err
}

func (a *Attestor) logTooLarge(key fileKey, pid int32) {
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
			"exe", a.proc.Path(pid, "exe"), "size", key.size, "limit", a.maxBinary)
	}
}
