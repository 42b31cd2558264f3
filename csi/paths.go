package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// csiVolumesDir is where the kubelet puts every CSI volume of a pod:
// <kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount.
// Other volume plugins' directories (emptyDir, ...) can be written by the
// pod itself, so targets there are never accepted.
const csiVolumesDir = "kubernetes.io~csi"

// splitTarget checks, without touching the file system, that target is an
// absolute, clean path <root>/pods/<uid>/volumes/kubernetes.io~csi/<...> and
// returns the pod UID and the path relative to root.
func splitTarget(root, target string) (podUID, rel string, err error) {
	if !filepath.IsAbs(target) {
		return "", "", invalidf("target path %q is not absolute", target)
	}
	for _, seg := range strings.Split(target, "/")[1:] {
		if seg == ".." || seg == "." {
			return "", "", invalidf("target path %q contains %q: refusing to leave the kubelet directory", target, seg)
		}
	}
	if filepath.Clean(target) != target {
		return "", "", invalidf("target path %q is not a clean path", target)
	}
	prefix := root + "/"
	if root == "/" {
		prefix = "/"
	}
	rel, ok := strings.CutPrefix(target, prefix)
	if !ok {
		return "", "", invalidf("target path %q is not under the kubelet directory %s", target, filepath.Join(root, "pods"))
	}
	segs := strings.Split(rel, "/")
	if len(segs) < 5 || segs[0] != "pods" || segs[2] != "volumes" || segs[3] != csiVolumesDir {
		return "", "", invalidf("target path %q is not a CSI volume path %s/pods/<pod uid>/volumes/%s/<volume>/...", target, root, csiVolumesDir)
	}
	if !podUIDRE.MatchString(segs[1]) {
		return "", "", invalidf("target path %q: %q is not a pod UID", target, segs[1])
	}
	return segs[1], rel, nil
}

// target is a target path that passed the checks.
type target struct {
	given  string // as the kubelet sent it; the records key
	real   string // the same place with the kubelet root's symlinks resolved
	root   string // the resolved kubelet root
	rel    string // real relative to root
	podUID string
	exists bool
}

// resolveTarget checks target lexically and then walks it below the kubelet
// root without following any symlink: the kubelet root itself may be a
// symlink, nothing below it may.
func (d *Driver) resolveTarget(given string) (target, error) {
	realRoot, err := filepath.EvalSymlinks(d.kubeletRoot)
	if err != nil {
		return target{}, fmt.Errorf("resolve kubelet root dir: %w", err)
	}
	podUID, rel, err := splitTarget(d.kubeletRoot, given)
	if err != nil && realRoot != d.kubeletRoot {
		// The kubelet may have been given the resolved root.
		if uid, r, err2 := splitTarget(realRoot, given); err2 == nil {
			podUID, rel, err = uid, r, nil
		}
	}
	if err != nil {
		return target{}, err
	}
	real, exists, err := walkNoSymlinks(realRoot, rel)
	if err != nil {
		return target{}, err
	}
	return target{given: given, real: real, root: realRoot, rel: rel, podUID: podUID, exists: exists}, nil
}

// walkNoSymlinks joins rel to root one segment at a time, refusing symlinks
// and non-directories. exists is false when some segment does not exist yet.
func walkNoSymlinks(root, rel string) (path string, exists bool, err error) {
	path = root
	segs := strings.Split(rel, "/")
	for i, seg := range segs {
		path = filepath.Join(path, seg)
		fi, err := os.Lstat(path)
		if errors.Is(err, fs.ErrNotExist) {
			return filepath.Join(root, rel), false, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("inspect %s: %w", path, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return "", false, invalidf("target path goes through the symlink %s: refusing to follow symlinks below the kubelet directory", path)
		}
		if !fi.IsDir() {
			if i == len(segs)-1 {
				return "", false, invalidf("target path %s exists and is not a directory", path)
			}
			return "", false, invalidf("target path goes through %s, which is not a directory", path)
		}
	}
	return path, true, nil
}

// The driver mounts on and unmounts from directories it holds open, never
// on a path looked up again: a symlink swapped into the path (a rename
// racing the checks above) could otherwise send the mount out of the
// kubelet root. Each directory is opened from the one before it with
// RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS. Not RESOLVE_NO_XDEV: the pods dir may
// be a mount of its own, and a published target is a mount point; crossing
// a mount does not leave the tree, following a symlink or ".." does.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS

// openDirAt opens path below the directory dirfd as an O_PATH directory,
// following no symlink and never leaving dirfd.
func openDirAt(dirfd int, path string) (int, error) {
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: resolveBeneath}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(dirfd, path, how)
		switch {
		case errors.Is(err, unix.EAGAIN) && i < 16:
			// A rename raced RESOLVE_BENEATH's checks; the kernel asks to retry.
			continue
		case errors.Is(err, unix.ENOSYS):
			return openDirNoFollow(dirfd, path)
		}
		return fd, err
	}
}

// openDirNoFollow stands in for openat2 on kernels before 5.6: one
// component at a time with O_NOFOLLOW. path holds no "." or ".." (splitTarget
// refused them), so this stays below dirfd just the same.
func openDirNoFollow(dirfd int, path string) (int, error) {
	cur := dirfd
	for _, seg := range strings.Split(path, "/") {
		fd, err := unix.Openat(cur, seg, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOTDIR) {
			// O_PATH|O_NOFOLLOW on a symlink says ENOTDIR; say what openat2 says.
			var st unix.Stat_t
			if unix.Fstatat(cur, seg, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
		}
		if cur != dirfd {
			unix.Close(cur)
		}
		if err != nil {
			return -1, err
		}
		cur = fd
	}
	return cur, nil
}

// openErr says why a target directory could not be opened.
func openErr(given string, err error) error {
	switch {
	case errors.Is(err, unix.ELOOP):
		return invalidf("target path %s goes through a symlink: refusing to follow symlinks below the kubelet directory", given)
	case errors.Is(err, unix.ENOTDIR):
		return invalidf("target path %s goes through something that is not a directory", given)
	case errors.Is(err, unix.EXDEV):
		return invalidf("target path %s leaves the kubelet directory", given)
	}
	return fmt.Errorf("open target %s: %w", given, err)
}

// openRoot opens the resolved kubelet root, the one place resolved by path.
func openRoot(t target) (*os.File, error) {
	fd, err := unix.Open(t.root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open kubelet root dir %s: %w", t.root, err)
	}
	return os.NewFile(uintptr(fd), t.root), nil
}

// openBeneath opens the target below root as it is now: a mount on it is
// what the handle shows.
func openBeneath(root *os.File, t target) (*os.File, error) {
	fd, err := openDirAt(int(root.Fd()), t.rel)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), t.real), nil
}

// dirHandle is a target directory held open, with the chain of
// directories that lead to it from the kubelet root.
type dirHandle struct {
	chain   []*os.File // root first, the target last
	created []createdDir
}

// createdDir is a directory the driver made: chain[parent]/name, which it
// removes again only if that name still holds the same directory.
type createdDir struct {
	parent   int
	name     string
	dev, ino uint64
}

func (h *dirHandle) root() *os.File { return h.chain[0] }
func (h *dirHandle) dir() *os.File  { return h.chain[len(h.chain)-1] }

func (h *dirHandle) close() {
	for _, f := range h.chain {
		f.Close()
	}
}

// openTarget opens t one directory at a time from the kubelet root,
// creating missing ones (0750) in the directory held open before them.
func openTarget(t target) (*dirHandle, error) {
	root, err := openRoot(t)
	if err != nil {
		return nil, err
	}
	h := &dirHandle{chain: []*os.File{root}}
	path := t.root
	for _, seg := range strings.Split(t.rel, "/") {
		parent := len(h.chain) - 1
		pfd := int(h.chain[parent].Fd())
		path = filepath.Join(path, seg)
		fd, err := openDirAt(pfd, seg)
		made := false
		if errors.Is(err, unix.ENOENT) {
			if err = unix.Mkdirat(pfd, seg, 0o750); err == nil || errors.Is(err, unix.EEXIST) {
				made = err == nil
				fd, err = openDirAt(pfd, seg)
			}
		}
		if err != nil {
			h.removeCreated()
			h.close()
			return nil, openErr(t.given, err)
		}
		h.chain = append(h.chain, os.NewFile(uintptr(fd), path))
		if made {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err == nil {
				h.created = append(h.created, createdDir{parent: parent, name: seg, dev: st.Dev, ino: st.Ino})
			}
		}
	}
	return h, nil
}

// waitRenames returns once no rename that moves the target directory is
// in flight. A mount point cannot be renamed (EBUSY), but a rename that
// passed that check before the mount was attached can still complete after
// it, carrying the new mount away. Every such rename holds the lock of the
// target's parent directory, which a mkdirat there takes too: when it
// returns (EEXIST), those renames are done, and later ones are refused.
func (h *dirHandle) waitRenames() {
	if len(h.chain) < 2 {
		return
	}
	parent := h.chain[len(h.chain)-2]
	_ = unix.Mkdirat(int(parent.Fd()), filepath.Base(h.dir().Name()), 0o750)
}

// removeCreated removes the directories openTarget made, innermost first,
// and only those: a name that now holds another directory is left.
func (h *dirHandle) removeCreated() {
	for i := len(h.created) - 1; i >= 0; i-- {
		c := h.created[i]
		pfd := int(h.chain[c.parent].Fd())
		var st unix.Stat_t
		if unix.Fstatat(pfd, c.name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || st.Dev != c.dev || st.Ino != c.ino {
			continue
		}
		_ = unix.Unlinkat(pfd, c.name, unix.AT_REMOVEDIR)
	}
	h.created = nil
}
