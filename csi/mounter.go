package csi

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
	"k8s.io/mount-utils"
)

// NewMounter returns the default Mounter: mount-utils, except that read-only
// bind mounts and unmounts are done with mount(2)/umount2(2) directly rather
// than by running mount(8) twice. That keeps a publish well under the
// kubelet's patience and does not depend on a mount binary in the image.
func NewMounter() mount.Interface {
	return &syscallMounter{Interface: mount.NewWithoutSystemd("")}
}

type syscallMounter struct {
	mount.Interface
}

// bindFlags maps the options the driver uses to mount(2) flags.
var bindFlags = map[string]uintptr{
	"bind":   unix.MS_BIND,
	"ro":     unix.MS_RDONLY,
	"nosuid": unix.MS_NOSUID,
	"nodev":  unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC,
}

// asBind returns the remount flags for a plain bind mount with options, or
// ok=false when the options ask for anything else.
func asBind(fstype string, options []string) (flags uintptr, ok bool) {
	if fstype != "" {
		return 0, false
	}
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

func (m *syscallMounter) Mount(source, target, fstype string, options []string) error {
	return m.MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype, options, nil, nil)
}

func (m *syscallMounter) MountSensitive(source, target, fstype string, options, sensitive []string) error {
	return m.MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype, options, sensitive, nil)
}

func (m *syscallMounter) MountSensitiveWithoutSystemd(source, target, fstype string, options, sensitive []string) error {
	return m.MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype, options, sensitive, nil)
}

func (m *syscallMounter) MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype string, options, sensitive, mountFlags []string) error {
	flags, ok := asBind(fstype, options)
	if !ok || len(sensitive) > 0 || len(mountFlags) > 0 {
		return m.Interface.MountSensitiveWithoutSystemdWithMountFlags(source, target, fstype, options, sensitive, mountFlags)
	}
	return bindMount(source, target, flags)
}

// bindMount bind-mounts source on target, then applies flags with a remount:
// mount(2) ignores per-mount flags on the first MS_BIND call.
func bindMount(source, target string, flags uintptr) error {
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	if flags&^unix.MS_BIND == 0 {
		return nil
	}
	// A remount must keep the atime flags the source mount has, or the kernel
	// refuses it inside a user namespace.
	var st unix.Statfs_t
	if err := unix.Statfs(source, &st); err == nil {
		for stFlag, msFlag := range map[int64]uintptr{
			unix.ST_NOATIME:    unix.MS_NOATIME,
			unix.ST_NODIRATIME: unix.MS_NODIRATIME,
			unix.ST_RELATIME:   unix.MS_RELATIME,
		} {
			if st.Flags&stFlag != 0 {
				flags |= msFlag
			}
		}
	}
	if err := unix.Mount("", target, "", flags|unix.MS_BIND|unix.MS_REMOUNT, ""); err != nil {
		// Never leave a writable bind mount behind.
		_ = unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
		return fmt.Errorf("remount %s with flags %#x: %w", target, flags, err)
	}
	return nil
}

// Unmount removes the top mount at target. Like mount-utils with safe
// not-mounted behaviour, a target that is not a mount point is no error.
func (m *syscallMounter) Unmount(target string) error {
	err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
	if errors.Is(err, unix.EINVAL) {
		if mounted, merr := m.IsMountPoint(target); merr == nil && !mounted {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}
