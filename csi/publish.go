package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/records"
)

// bindOptions make the mount itself read-only: the container runtime's bind
// of the target inherits them, so the pod cannot write through it even when
// its volumeMount says read-write. connect(2) on a socket still works.
var bindOptions = []string{"bind", "ro", "nosuid", "nodev", "noexec"}

// snapshot reads the mount table and locates the socket directory in it.
func (d *Driver) snapshot() ([]*mountinfo.Info, source, string, error) {
	dir, err := d.socketSource()
	if err != nil {
		return nil, source{}, "", err
	}
	table, src, err := d.tableWith(dir)
	return table, src, dir, err
}

// socketSource resolves the socket directory, which must exist.
func (d *Driver) socketSource() (string, error) {
	dir, err := filepath.EvalSymlinks(d.socketDir)
	if err != nil {
		return "", fmt.Errorf("workload API socket directory: %w", err)
	}
	return dir, nil
}

func (d *Driver) tableWith(srcDir string) ([]*mountinfo.Info, source, error) {
	table, err := d.mounter.MountTable()
	if err != nil {
		return nil, source{}, err
	}
	src, err := sourceOf(table, srcDir)
	return table, src, err
}

// publish makes the target a read-only bind mount of the socket directory and
// records it. The order (mount, record, answer) keeps a crash harmless:
//   - before the mount: nothing happened; the kubelet retries.
//   - between mount and record: Reconcile finds a mount of ours without a
//     record and unmounts it; the kubelet retries.
//   - between record and answer: mount and record agree; the kubelet's retry
//     is a no-op success.
func (d *Driver) publish(p publishRequest) error {
	// Resolve under the lock: a call for the same target queued behind this
	// one must see what this one did, or it would mount a second layer.
	d.mu.Lock()
	defer d.mu.Unlock()

	t, err := d.resolveTarget(p.target)
	if err != nil {
		return err
	}
	if t.podUID != p.podUID {
		return invalidf("target path %q belongs to pod %s, not to pod %s named in the volume context (%s)", p.target, t.podUID, p.podUID, ctxPodUID)
	}

	srcDir, err := d.socketSource()
	if err != nil {
		return err
	}
	rec := records.Record{
		VolumeID:       p.volumeID,
		PodUID:         p.podUID,
		PodNamespace:   p.podNamespace,
		PodName:        p.podName,
		ServiceAccount: p.serviceAccount,
		TargetPath:     p.target,
	}
	state, why := stateUnmounted, ""
	if t.exists {
		mounted, err := d.mounter.IsMountPoint(t.real)
		if err != nil {
			return err
		}
		if mounted {
			table, src, err := d.tableWith(srcDir)
			if err != nil {
				return err
			}
			state, why = classify(layersAt(table, t.real), src)
		}
	}
	if state == stateForeign {
		return conflictf("target path %s already holds a mount that is not ours: %s; refusing to stack a mount on it", p.target, why)
	}
	if old, ok := d.records.ByTarget(p.target); ok && state != stateUnmounted && old.VolumeID != p.volumeID {
		return alreadyExistsf("target path %s is already published for volume %s, not %s", p.target, old.VolumeID, p.volumeID)
	}
	if state == stateOurs {
		// A repeated publish: make sure it is recorded, never mount again.
		if old, ok := d.records.ByTarget(p.target); ok && sameRecord(old, rec) {
			return nil
		}
		return d.record(rec, t, nil)
	}
	if state == stateOursBroken {
		klog.InfoS("Replacing a broken mount at the target", "target", p.target, "volume_id", p.volumeID, "reason", why)
		if err := d.unmountAll(t); err != nil {
			return err
		}
	}

	h, err := d.mount(srcDir, t)
	if err != nil {
		return fmt.Errorf("mount the Workload API socket directory at %s: %w", p.target, err)
	}
	defer h.close()
	return d.record(rec, t, h)
}

// mount opens t from the kubelet root, creating what is missing, attaches
// the socket directory on the directory it holds open, and checks that the
// mount is what t now shows. On failure it leaves neither the mount nor the
// directories it made.
func (d *Driver) mount(srcDir string, t target) (*dirHandle, error) {
	h, err := openTarget(t)
	if err != nil {
		return nil, err
	}
	mnt, err := d.mounter.BindMount(srcDir, h.dir(), bindOptions)
	if err != nil {
		h.removeCreated()
		h.close()
		return nil, err
	}
	if mnt != nil {
		defer mnt.Close()
	}
	if d.hooks.afterMount != nil {
		d.hooks.afterMount(t.given)
	}
	h.waitRenames()
	// Check the result rather than trust the mounter, through the path as
	// it resolves now: a rename during the attach may have taken the
	// directory, and the mount on it, elsewhere.
	err = d.checkBind(srcDir, h.root(), t)
	if err == nil {
		return h, nil
	}
	// Detach exactly what was attached, wherever it is.
	var uerr error
	if mnt != nil {
		uerr = d.mounter.Unmount(mnt)
	} else {
		uerr = d.unmountTop(h.root(), t)
	}
	if uerr == nil {
		h.removeCreated()
	}
	h.close()
	return nil, errors.Join(err, uerr)
}

// checkBind checks the mount visible at t, opened beneath root.
func (d *Driver) checkBind(srcDir string, root *os.File, t target) error {
	f, err := openBeneath(root, t)
	if err != nil {
		return openErr(t.given, err)
	}
	defer f.Close()
	return d.mounter.CheckBind(srcDir, f)
}

// unmountTop detaches the top mount visible at t, opened beneath root.
func (d *Driver) unmountTop(root *os.File, t target) error {
	f, err := openBeneath(root, t)
	if err != nil {
		return openErr(t.given, err)
	}
	defer f.Close()
	return d.mounter.Unmount(f)
}

// record stores rec durably; on failure it undoes the mount and the
// directories it made, so that no mount is left without a record.
func (d *Driver) record(rec records.Record, t target, h *dirHandle) error {
	rec.PublishedAt = d.now().UTC()
	if err := d.records.Put(rec); err != nil {
		return d.rollback(t, h, err)
	}
	if d.hooks.afterRecord != nil {
		d.hooks.afterRecord(rec.TargetPath)
	}
	klog.InfoS("Published the Workload API socket", "pod", klog.KRef(rec.PodNamespace, rec.PodName),
		"pod_uid", rec.PodUID, "service_account", rec.ServiceAccount, "volume_id", rec.VolumeID, "target", rec.TargetPath)
	return nil
}

// rollback undoes a mount of t; h, when not nil, holds the directories
// that publish made.
func (d *Driver) rollback(t target, h *dirHandle, cause error) error {
	if err := d.unmountAll(t); err != nil {
		return errors.Join(cause, err)
	}
	if h != nil {
		h.removeCreated()
	}
	return cause
}

func sameRecord(a, b records.Record) bool {
	a.PublishedAt, b.PublishedAt = time.Time{}, time.Time{}
	return a == b
}

// unpublish unmounts every layer at the target, removes the directory and
// then the record. A crash between the steps leaves a record without a mount,
// which Reconcile drops. A target that is gone (node reboot) or never existed
// is a success.
//
// It takes away only what publish gave: a target recorded for another
// volume is NotFound (CSI: no such volume at this target), and a mount
// stack that does not start with a bind of the socket directory (another
// driver's, or what a refused publish found) is FailedPrecondition; both
// are left as they are. Layers stacked on a mount of ours go with it.
func (d *Driver) unpublish(volumeID, targetPath string) error {
	if err := validateVolumeID(volumeID); err != nil {
		return err
	}
	if targetPath == "" {
		return invalidf("target_path is missing")
	}
	// Resolve under the lock, for the same reason as publish: an unpublish
	// that resolved before a queued publish mounted would leave its mount.
	d.mu.Lock()
	defer d.mu.Unlock()

	t, err := d.resolveTarget(targetPath)
	if err != nil {
		return err
	}
	rec, had := d.records.ByTarget(targetPath)
	if had && rec.VolumeID != volumeID {
		return notFoundf("volume %s is not published at %s: the target holds volume %s", volumeID, targetPath, rec.VolumeID)
	}

	if t.exists {
		if err := d.checkOwnMount(t); err != nil {
			return err
		}
		if err := d.unmountAll(t); err != nil {
			return err
		}
		if err := removeTarget(t); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
				return conflictf("target path %s is not empty after unmounting; it holds files the driver did not create", targetPath)
			}
			return fmt.Errorf("remove target %s: %w", targetPath, err)
		}
	}
	if err := d.records.Delete(targetPath); err != nil {
		return err
	}
	if had {
		klog.InfoS("Unpublished the Workload API socket", "pod", klog.KRef(rec.PodNamespace, rec.PodName),
			"pod_uid", rec.PodUID, "volume_id", volumeID, "target", targetPath)
	} else {
		klog.InfoS("Unpublished a target that had no record", "pod_uid", t.podUID, "volume_id", volumeID, "target", targetPath, "existed", t.exists)
	}
	return nil
}

// removeTarget removes the target directory from its parent, opened
// beneath the kubelet root: a symlink swapped into the path makes it fail
// rather than remove a directory elsewhere.
func removeTarget(t target) error {
	root, err := openRoot(t)
	if err != nil {
		return err
	}
	defer root.Close()
	dir, name := filepath.Split(t.rel)
	pfd, err := openDirAt(int(root.Fd()), filepath.Clean(dir))
	if err != nil {
		return openErr(t.given, err)
	}
	defer unix.Close(pfd)
	return unix.Unlinkat(pfd, name, unix.AT_REMOVEDIR)
}

// checkOwnMount refuses a target whose mount stack does not start with a
// bind of the socket directory. An unmounted target passes.
func (d *Driver) checkOwnMount(t target) error {
	mounted, err := d.mounter.IsMountPoint(t.real)
	if err != nil || !mounted {
		return err
	}
	// The socket dir may be gone (the agent recreates it); its mounts still
	// show the path it had.
	srcDir, err := d.socketSource()
	if err != nil {
		srcDir = d.socketDir
	}
	table, src, err := d.tableWith(srcDir)
	if err != nil {
		return err
	}
	if b := bottom(layersAt(table, t.real)); b != nil && !src.owns(b) && !src.ownsStale(b) {
		return conflictf("target path %s holds a mount that is not the driver's (%s, %s%s); leaving it", t.given, b.Source, b.FSType, b.Root)
	}
	return nil
}

// maxLayers bounds the unmount loop: nothing legitimate stacks this deep.
const maxLayers = 64

// unmountAll removes every mount stacked at t, each through a handle on
// the mount visible there, opened beneath the kubelet root.
func (d *Driver) unmountAll(t target) error {
	root, err := openRoot(t)
	if err != nil {
		return err
	}
	defer root.Close()
	for i := 0; i <= maxLayers; i++ {
		mounted, err := d.mounter.IsMountPoint(t.real)
		if err != nil {
			return err
		}
		if !mounted {
			return nil
		}
		if i == maxLayers {
			break
		}
		if err := d.unmountTop(root, t); err != nil {
			return fmt.Errorf("unmount %s: %w", t.real, err)
		}
	}
	return fmt.Errorf("%s still holds mounts after %d unmounts", t.real, maxLayers)
}
