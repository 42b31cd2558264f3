package csi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"k8s.io/klog/v2"
)

// reconcileResult says what Reconcile changed.
type reconcileResult struct {
	Kept     int      // records whose target still holds our mount
	Dropped  []string // records dropped: their target no longer holds our mount
	Orphans  []string // mounts of ours without a record, unmounted
	Repaired []string // recorded mounts that were stacked or not read-only, mounted afresh
	Failed   []error  // targets left as they were: one bad target must not stop the node's agent
}

// Reconcile makes the records and the mount table agree; call it on start,
// before Serve. Records whose target no longer holds our mount (a node
// reboot, a crash during unpublish) are dropped. A mount of the socket
// directory under the kubelet's pods directory without a record is the
// orphan of a crash between mount and record: it is unmounted and the
// kubelet's retry publishes it again.
//
// Only a failure that concerns every target (the mount table unreadable,
// the socket dir missing) is returned: a single target that cannot be
// repaired or unmounted is logged and left, so the agent still serves
// every other pod on the node.
func (d *Driver) Reconcile(ctx context.Context) error {
	res, err := d.reconcile(ctx)
	for _, f := range res.Failed {
		klog.ErrorS(f, "Reconcile left a target as it was")
	}
	return err
}

func (d *Driver) reconcile(ctx context.Context) (reconcileResult, error) {
	var res reconcileResult
	d.mu.Lock()
	defer d.mu.Unlock()

	table, src, srcDir, err := d.snapshot()
	if err != nil {
		return res, err
	}
	realRoot, err := filepath.EvalSymlinks(d.kubeletRoot)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("resolve kubelet root dir: %w", err)
	}

	recorded := map[string]bool{}
	for _, rec := range d.records.All() {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		real, ok := d.realPath(realRoot, rec.TargetPath)
		state, why := stateUnmounted, "the target path is not a CSI volume path of the kubelet"
		if ok {
			state, why = classify(layersAt(table, real), src)
		}
		switch state {
		case stateOurs:
			recorded[real] = true
			res.Kept++
			continue
		case stateOursBroken:
			klog.InfoS("Repairing a recorded mount", "target", rec.TargetPath, "volume_id", rec.VolumeID, "reason", why)
			err := d.unmountAll(real)
			if err == nil {
				err = d.mounter.BindMount(srcDir, real, bindOptions)
			}
			if err == nil {
				recorded[real] = true
				res.Kept++
				res.Repaired = append(res.Repaired, rec.TargetPath)
				continue
			}
			res.Failed = append(res.Failed, fmt.Errorf("repair mount at %s: %w", rec.TargetPath, err))
			_ = d.unmountAll(real)
		}
		if err := d.records.Delete(rec.TargetPath); err != nil {
			res.Failed = append(res.Failed, err)
			continue
		}
		res.Dropped = append(res.Dropped, rec.TargetPath)
		klog.InfoS("Dropped a publish record whose target no longer holds the socket mount",
			"pod", klog.KRef(rec.PodNamespace, rec.PodName), "pod_uid", rec.PodUID, "volume_id", rec.VolumeID, "target", rec.TargetPath, "reason", why)
	}

	if realRoot == "" {
		return res, nil
	}
	podsDir := filepath.Join(realRoot, "pods")
	seen := map[string]bool{}
	for _, m := range table {
		mp := m.Mountpoint
		if mp == podsDir || !isUnder(mp, podsDir) || seen[mp] || recorded[mp] {
			continue
		}
		seen[mp] = true
		// Only CSI volume paths are ours to clean: the kubelet's subPath binds
		// (pods/<uid>/volume-subpaths/...) may show the socket dir too.
		if _, _, err := splitTarget(realRoot, mp); err != nil {
			continue
		}
		if state, _ := classify(layersAt(table, mp), src); state != stateOurs && state != stateOursBroken {
			continue
		}
		if err := d.unmountAll(mp); err != nil {
			res.Failed = append(res.Failed, err)
			continue
		}
		_ = os.Remove(mp)
		res.Orphans = append(res.Orphans, mp)
		klog.InfoS("Unmounted a socket mount that had no record (crash between mount and record)", "target", mp)
	}
	return res, nil
}

// realPath maps a recorded target to the resolved kubelet root, lexically.
func (d *Driver) realPath(realRoot, given string) (string, bool) {
	if realRoot == "" {
		return "", false
	}
	_, rel, err := splitTarget(d.kubeletRoot, given)
	if err != nil {
		if _, rel, err = splitTarget(realRoot, given); err != nil {
			return "", false
		}
	}
	return filepath.Join(realRoot, rel), true
}
