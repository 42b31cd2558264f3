package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
)

// Mounter is the driver's seam to the kernel's mounts. It performs mounts
// and reports what is mounted; whether a mount is ours and what to do about
// it, the driver decides. Every mount-state check goes through it, so the
// driver's logic can run against a mount table held in memory.
type Mounter interface {
	// BindMount bind-mounts source with options (bindOptions) on the
	// directory open as target: an O_PATH descriptor the driver resolved
	// beneath the kubelet root without following symlinks. The mount lands
	// on that directory, not on whatever its path names by then. It returns
	// a handle on the root of the new mount, to check or detach exactly
	// that mount, or nil when the kernel gives none (before open_tree, 5.2).
	BindMount(source string, target *os.File, options []string) (*os.File, error)
	// Unmount detaches the mount whose root target is open on (a handle
	// from BindMount, or a directory opened where a mount is visible); a
	// target that is not a mount root is no error.
	Unmount(target *os.File) error
	// IsMountPoint reports whether something is mounted at path; a path
	// that does not exist is not a mount point.
	IsMountPoint(path string) (bool, error)
	// MountTable lists every mount, in the kernel's order.
	MountTable() ([]*mountinfo.Info, error)
	// CheckBind verifies that target, open on a mount root, shows source
	// with requiredOpts (read-only, nosuid, nodev, noexec).
	CheckBind(source string, target *os.File) error
}

// fdPath names the file open as f through procfs: mount(2) and umount2(2)
// given it act on that very file, not on a path looked up again.
func fdPath(f *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", f.Fd()) }

// NewMounter returns the kernel's Mounter. It mounts and unmounts with
// open_tree/move_mount (or mount(2)) and umount2(2) directly rather than by running mount(8) twice: that
// keeps a publish well under the kubelet's patience and does not depend on
// a mount binary in the image.
func NewMounter() Mounter { return kernelMounter{} }

type kernelMounter struct {
	// exec, when set, mounts and unmounts through mount-utils (mount(8));
	// tests compare the two.
	exec mount.Interface
}

// bindFlags maps the options the driver uses to mount(2) flags.
var bindFlags = map[string]uintptr{
	"bind":   unix.MS_BIND,
	"ro":     unix.MS_RDONLY,
	"nosuid": unix.MS_NOSUID,
	"nodev":  unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC,
}

// asBind returns the mount(2) flags for a plain bind mount with options, or
// ok=false when the options ask for anything else.
func asBind(options []string) (flags uintptr, ok bool) {
	bind := false
	for _, o := range options {
		f, known := bindFlags[o]
		if !known {
			return 0, false
		}
		if o == "bind" {
			bind = true
		}
		flags |= f
	}
	return flags, bind
}

func (k kernelMounter) BindMount(source string, target *os.File, options []string) (*os.File, error) {
	if k.exec != nil {
		// mount(8) runs in another process: name our descriptor through its pid.
		at := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), target.Fd())
		return nil, k.exec.MountSensitiveWithoutSystemd(source, at, "", options, nil)
	}
	flags, ok := asBind(options)
	if !ok {
		return nil, fmt.Errorf("mount %s on %s: options %q are not a plain bind mount", source, target.Name(), options)
	}
	return bindMount(source, target, flags)
}

// bindMount bind-mounts source on the directory open as target with flags.
// The mount must carry its flags from the moment it is attached: the agent
// runs in a container whose kubelet dir propagates mounts to the host, and
// a later remount changes the flags only in the agent's own namespace,
// leaving the host's copy (the one the kubelet and the pod see) writable.
func bindMount(source string, target *os.File, flags uintptr) (*os.File, error) {
	if flags&^unix.MS_BIND == 0 {
		if err := unix.Mount(source, fdPath(target), "", unix.MS_BIND, ""); err != nil {
			return nil, fmt.Errorf("bind mount %s on %s: %w", source, target.Name(), err)
		}
		return nil, nil
	}
	mnt, err := attachDetached(source, target, flags)
	if errors.Is(err, unix.ENOSYS) {
		// Kernels before 5.12 lack mount_setattr.
		return nil, bindFromReadOnlyCopy(source, target, flags)
	}
	return mnt, err
}

// attachDetached clones source as a detached mount, sets its flags, then
// attaches it on target (open_tree, mount_setattr, move_mount from one
// descriptor to the other: no path is looked up at attach time). It
// returns the attached mount's root.
func attachDetached(source string, target *os.File, flags uintptr) (*os.File, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, source, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("clone mount of %s: %w", source, err)
	}
	attr := &unix.MountAttr{Attr_set: mountAttrs(flags)}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, attr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set mount attributes of %s: %w", source, err)
	}
	if err := unix.MoveMount(fd, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach mount of %s on %s: %w", source, target.Name(), err)
	}
	return os.NewFile(uintptr(fd), "mount of "+source+" on "+target.Name()), nil
}

func mountAttrs(flags uintptr) uint64 {
	var attrs uint64
	for ms, attr := range map[uintptr]uint64{
		unix.MS_RDONLY: unix.MOUNT_ATTR_RDONLY,
		unix.MS_NOSUID: unix.MOUNT_ATTR_NOSUID,
		unix.MS_NODEV:  unix.MOUNT_ATTR_NODEV,
		unix.MS_NOEXEC: unix.MOUNT_ATTR_NOEXEC,
	} {
		if flags&ms != 0 {
			attrs |= attr
		}
	}
	return attrs
}

// bindFromReadOnlyCopy is the path for older kernels: a bind inherits the
// flags of the mount it copies, so the source is first bound, privately, to
// a scratch directory and remounted with flags there (that copy never
// propagates), then bound from that copy onto target, then dropped.
func bindFromReadOnlyCopy(source string, target *os.File, flags uintptr) error {
	scratch, err := os.MkdirTemp("", "csi-agent-ro-")
	if err != nil {
		return fmt.Errorf("scratch dir for a read-only copy: %w", err)
	}
	defer os.Remove(scratch)
	if err := unix.Mount(source, scratch, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, scratch, err)
	}
	defer unix.Unmount(scratch, unix.MNT_DETACH)
	if err := unix.Mount("", scratch, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", scratch, err)
	}
	if err := unix.Mount("", scratch, "", flags|keepAtime(source)|unix.MS_BIND|unix.MS_REMOUNT, ""); err != nil {
		return fmt.Errorf("remount %s with flags %#x: %w", scratch, flags, err)
	}
	if err := unix.Mount(scratch, fdPath(target), "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target.Name(), err)
	}
	return nil
}

// keepAtime returns the atime flags the mount at path has: a remount must
// keep them, or the kernel refuses it inside a user namespace.
func keepAtime(path string) uintptr {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0
	}
	var flags uintptr
	for stFlag, msFlag := range map[int64]uintptr{
		unix.ST_NOATIME:    unix.MS_NOATIME,
		unix.ST_NODIRATIME: unix.MS_NODIRATIME,
		unix.ST_RELATIME:   unix.MS_RELATIME,
	} {
		if st.Flags&stFlag != 0 {
			flags |= msFlag
		}
	}
	return flags
}

// Unmount detaches the mount whose root target is open on. It detaches
// (MNT_DETACH) because the handle itself holds the mount busy; nothing else
// can reach the mount once it is detached. A target that is not a mount
// root (EINVAL) is no error. With mount-utils, too, the unmount is the
// kernel's: a umount(8) would fail on the busy mount.
func (kernelMounter) Unmount(target *os.File) error {
	err := unix.Unmount(fdPath(target), unix.MNT_DETACH)
	if errors.Is(err, unix.EINVAL) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", target.Name(), err)
	}
	return nil
}

// IsMountPoint asks the kernel directly (openat2, no mount table read, which
// costs real time on a node with thousands of mounts) and falls back to the
// table when the kernel cannot say for sure.
func (k kernelMounter) IsMountPoint(path string) (bool, error) {
	mounted, sure, err := mountinfo.MountedFast(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err == nil && sure {
		return mounted, nil
	}
	table, err := k.MountTable()
	if err != nil {
		return false, err
	}
	return len(layersAt(table, path)) > 0, nil
}

func (kernelMounter) MountTable() ([]*mountinfo.Info, error) {
	table, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	return table, nil
}

// CheckBind checks without the mount table: target must show the source's
// inode, through a mount with the read-only flags.
func (kernelMounter) CheckBind(source string, target *os.File) error {
	var src, tgt unix.Stat_t
	if err := unix.Stat(source, &src); err != nil {
		return fmt.Errorf("stat %s: %w", source, err)
	}
	if err := unix.Fstat(int(target.Fd()), &tgt); err != nil {
		return fmt.Errorf("stat %s: %w", target.Name(), err)
	}
	if src.Dev != tgt.Dev || src.Ino != tgt.Ino {
		return fmt.Errorf("%s does not show the socket directory", target.Name())
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(target.Fd()), &st); err != nil {
		return fmt.Errorf("statfs %s: %w", target.Name(), err)
	}
	const want = unix.ST_RDONLY | unix.ST_NOSUID | unix.ST_NODEV | unix.ST_NOEXEC
	if st.Flags&want != want {
		return fmt.Errorf("the mount at %s has flags %#x, want read-only, nosuid, nodev, noexec", target.Name(), st.Flags)
	}
	return nil
}
