// Package procfs opens and reads the per-process files of one procfs tree.
// It owns the size limits and the mapping of "the process went away"
// (ENOENT, ESRCH) to ErrGone; parsing stays with the callers.
package procfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

var (
	// ErrGone: the process has exited (or was reaped) since its pid was
	// learnt. Errors wrapping it also wrap the errno that said so.
	ErrGone = errors.New("process is gone")
	// ErrTooLarge: the file is larger than the caller's limit.
	ErrTooLarge = errors.New("file larger than the read limit")
)

// FS is a procfs tree rooted at a directory, normally "/proc". Which tree
// is security-sensitive: a pid means the process holding it in the PID
// namespace the tree belongs to.
type FS struct {
	root string
}

// New returns the procfs at root.
func New(root string) (*FS, error) {
	if root == "" {
		return nil, errors.New("procfs: empty root")
	}
	return &FS{root: filepath.Clean(root)}, nil
}

// Root is the directory the FS reads.
func (f *FS) Root() string { return f.root }

// Path returns <root>/<pid>/<name>, or the pid directory when name is "".
func (f *FS) Path(pid int32, name string) string {
	p := f.root + "/" + strconv.FormatInt(int64(pid), 10)
	if name != "" {
		p += "/" + name
	}
	return p
}

// Open opens <root>/<pid>/<name> read-only and returns the descriptor,
// which the caller closes.
func (f *FS) Open(pid int32, name string) (int, error) {
	path := f.Path(pid, name)
	fd, err := open(unix.AT_FDCWD, path, unix.O_RDONLY)
	if err != nil {
		return -1, pathErr("open", path, err)
	}
	return fd, nil
}

// OpenPIDDir opens the directory of pid with O_PATH: a handle that stops
// resolving once the process is reaped, even if the pid is reused. Read
// through it with ReadFileAt; the caller closes it.
func (f *FS) OpenPIDDir(pid int32) (int, error) {
	path := f.Path(pid, "")
	fd, err := open(unix.AT_FDCWD, path, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return -1, pathErr("open", path, err)
	}
	return fd, nil
}

// ReadFile reads <root>/<pid>/<name>, which must be at most limit bytes,
// into buf's storage (growing it as needed) and returns the content.
func (f *FS) ReadFile(pid int32, name string, buf []byte, limit int) ([]byte, error) {
	return readFile(unix.AT_FDCWD, f.Path(pid, name), buf, limit)
}

// Readlink returns the target of the link <root>/<pid>/<name> (exe, cwd).
func (f *FS) Readlink(pid int32, name string) (string, error) {
	path := f.Path(pid, name)
	s, err := os.Readlink(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return "", pathErr("readlink", path, err)
	}
	return s, nil
}

// ReadFileAt is ReadFile for name relative to dirfd, a directory from
// OpenPIDDir.
func ReadFileAt(dirfd int, name string, buf []byte, limit int) ([]byte, error) {
	return readFile(dirfd, name, buf, limit)
}

func readFile(dirfd int, path string, buf []byte, limit int) ([]byte, error) {
	fd, err := open(dirfd, path, unix.O_RDONLY)
	if err != nil {
		return nil, pathErr("open", path, err)
	}
	defer unix.Close(fd)
	return readAll(fd, path, buf, limit)
}

// open opens path relative to dirfd (unix.AT_FDCWD: absolute paths).
func open(dirfd int, path string, flags int) (int, error) {
	for {
		fd, err := unix.Openat(dirfd, path, flags|unix.O_CLOEXEC, 0)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// readAll reads fd to the end into buf's storage. procfs files report no
// size, so the buffer doubles until a read returns 0.
func readAll(fd int, path string, buf []byte, limit int) ([]byte, error) {
	buf = buf[:cap(buf)]
	if len(buf) > limit {
		buf = buf[:limit]
	}
	n := 0
	for {
		if n == len(buf) {
			if n >= limit {
				// Full at the limit: only an empty read proves the end.
				var one [1]byte
				m, err := read(fd, one[:])
				if err != nil {
					return nil, pathErr("read", path, err)
				}
				if m > 0 {
					return nil, fmt.Errorf("read %s: %w (%d bytes)", path, ErrTooLarge, limit)
				}
				return buf[:n], nil
			}
			grown := make([]byte, min(max(2*len(buf), 512), limit))
			copy(grown, buf[:n])
			buf = grown
		}
		m, err := read(fd, buf[n:])
		if err != nil {
			// ESRCH: the process exited between open and read.
			return nil, pathErr("read", path, err)
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}

func read(fd int, p []byte) (int, error) {
	for {
		n, err := unix.Read(fd, p)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// pathErr wraps err, an errno, adding ErrGone where it means the process
// went away.
func pathErr(op, path string, err error) error {
	if err == unix.ENOENT || err == unix.ESRCH {
		return fmt.Errorf("%s %s: %w (%w)", op, path, ErrGone, err)
	}
	return fmt.Errorf("%s %s: %w", op, path, err)
}
