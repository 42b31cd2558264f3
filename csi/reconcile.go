package csi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"k8s.io/klog/v2"
)

// reconcileResult says what Reconcile changed.
type reconcileResult struct {
	Kept     int      // records whose target still holds our mount
	Dropped  []string // records dropped: their target no longer holds our mount
	Orphans  []string // mounts of ours without a record, unmounted
	Repaired []string // recorded mounts that were stacked or not read-only, mounted afresh
	// Unrecorded are mounts of ours without a record, kept because the
	// records journal was damaged: their records may be among the lost.
	Unrecorded []string
	Failed     []error // targets left as they were: one bad target must not stop the node's agent
}

// Reconcile makes the records and the mount table agree; call it on start,
// before Serve. Records whose target no longer holds our mount (a node
// reboot, a crash during unpublish) are dropped. A mount of the socket
// directory under the kubelet's pods directory without a record is the
// orphan of a crash between mount and record: it is unmounted and the
// kubelet's retry publishes it again. Unless the records journal was
// damaged (records.Store.Quarantined): then the mount may be a live pod's
// whose record was lost, and it is kept and logged.
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
		t, ok := d.recordedTarget(realRoot, rec.TargetPath)
		state, why := stateUnmounted, "the target path is not a CSI volume path of the kubelet"
		if ok {
			state, why = classify(layersAt(table, t.real), src)
		}
		switch state {
		case stateOurs:
			recorded[t.real] = true
			res.Kept++
			continue
		case stateOursBroken:
			klog.InfoS("Repairing a recorded mount", "target", rec.TargetPath, "volume_id", rec.VolumeID, "reason", why)
			err := d.unmountAll(t)
			if err == nil {
				var h *dirHandle
				if h, err = d.mount(srcDir, t); err == nil {
					h.close()
				}
			}
			if err == nil {
				recorded[t.real] = true
				res.Kept++
				res.Repaired = append(res.Repaired, rec.TargetPath)
				continue
			}
			res.Failed = append(res.Failed, fmt.Errorf("repair mount at %s: %w", rec.TargetPath, err))
			_ = d.unmountAll(t)
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
	quarantined := d.records.Quarantined()
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
		uid, rel, err := splitTarget(realRoot, mp)
		if err != nil {
			continue
		}
		if state, _ := classify(layersAt(table, mp), src); state != stateOurs && state != stateOursBroken {
			continue
		}
		if len(quarantined) > 0 {
			klog.ErrorS(nil, "Keeping a socket mount that has no record: the records journal was damaged and its record may be among the lost lines; the pod's identity checks fail until it is published again",
				"target", mp, "pod_uid", uid, "path", strings.Join(quarantined, ","))
			res.Unrecorded = append(res.Unrecorded, mp)
			continue
		}
		orphan := target{given: mp, real: mp, root: realRoot, rel: rel, podUID: uid, exists: true}
		if err := d.unmountAll(orphan); err != nil {
			res.Failed = append(res.Failed, err)
			continue
		}
		_ = removeTarget(orphan)
		res.Orphans = append(res.Orphans, mp)
		klog.InfoS("Unmounted a socket mount that had no record (crash between mount and record)", "target", mp)
	}
	return res, nil
}

// recordedTarget maps a recorded target to the resolved kubelet root,
// lexically.
func (d *Driver) recordedTarget(realRoot, given string) (target, bool) {
	if realRoot == "" {
		return target{}, false
	}
	uid, rel, err := splitTarget(d.kubeletRoot, given)
	if err != nil {
		if uid, rel, err = splitTarget(realRoot, given); err != nil {
			return target{}, false
		}
	}
	return target{given: given, real: filepath.Join(realRoot, rel), root: realRoot, rel: rel, podUID: uid, exists: true}, true
}
