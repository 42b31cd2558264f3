package csi

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/csi-agent/csi-agent/internal/records"
)

// volumeCheck is the health of one published volume.
type volumeCheck struct {
	record   records.Record
	real     string // resolved target, when it holds our mount
	abnormal bool
	reason   string // CamelCase, for VolumeHealth
	message  string
}

// volumeStats is checkVolume for NodeGetVolumeStats, where the path is required.
func (d *Driver) volumeStats(volumeID, volumePath string) (volumeCheck, error) {
	if err := validateVolumeID(volumeID); err != nil {
		return volumeCheck{}, err
	}
	if volumePath == "" {
		return volumeCheck{}, invalidf("volume_path is missing")
	}
	return d.checkVolume(volumeID, volumePath)
}

// checkVolume finds the record of volumeID (at path, when path is given) and
// tells whether its target still serves the Workload API socket.
func (d *Driver) checkVolume(volumeID, path string) (volumeCheck, error) {
	if err := validateVolumeID(volumeID); err != nil {
		return volumeCheck{}, err
	}
	rec, ok := d.findRecord(volumeID, path)
	if !ok {
		if path == "" {
			return volumeCheck{}, notFoundf("volume %s is not published on this node", volumeID)
		}
		return volumeCheck{}, notFoundf("volume %s is not published at %s", volumeID, path)
	}
	c := volumeCheck{record: rec}
	bad := func(reason, format string, args ...any) (volumeCheck, error) {
		c.abnormal, c.reason, c.message = true, reason, fmt.Sprintf(format, args...)
		return c, nil
	}
	if _, err := os.Stat(d.socketDir); errors.Is(err, fs.ErrNotExist) {
		return bad("SocketDirGone", "the Workload API socket directory %s is gone", d.socketDir)
	}
	t, err := d.resolveTarget(rec.TargetPath)
	if err != nil {
		return bad("TargetInvalid", "%v", err)
	}
	if !t.exists {
		return bad("TargetGone", "the target %s is gone", rec.TargetPath)
	}
	d.mu.Lock()
	table, src, _, err := d.snapshot()
	d.mu.Unlock()
	if err != nil {
		return bad("SocketDirGone", "%v", err)
	}
	switch state, why := classify(layersAt(table, t.real), src); state {
	case stateUnmounted:
		return bad("NotMounted", "%s", why)
	case stateForeign:
		return bad("ForeignMount", "%s", why)
	case stateOursBroken:
		return bad("MountBroken", "%s", why)
	}
	c.real = t.real
	c.message = "the Workload API socket directory is mounted read-only"
	return c, nil
}

func (d *Driver) findRecord(volumeID, path string) (records.Record, bool) {
	if path != "" {
		rec, ok := d.records.ByTarget(path)
		return rec, ok && rec.VolumeID == volumeID
	}
	for _, rec := range d.records.All() {
		if rec.VolumeID == volumeID {
			return rec, true
		}
	}
	return records.Record{}, false
}

// usage reports the socket directory's file system through the target.
func usage(path string) []*csipb.VolumeUsage {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil
	}
	bs := uint64(st.Bsize)
	return []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(st.Blocks * bs), Available: int64(st.Bavail * bs), Used: int64((st.Blocks - st.Bfree) * bs)},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}
}

// The volume condition is field 2 of NodeGetVolumeStatsResponse up to CSI
// 1.12, where the kubelet (CSIVolumeHealth) reads it; the 1.13 bindings
// reserve the field, so it is written as raw wire data:
// message VolumeCondition { bool abnormal = 1; string message = 2; }.
const (
	statsConditionField     = 2
	conditionAbnormalField  = 1
	conditionMessageField   = 2
	nodeVolumeConditionCapa = csipb.NodeServiceCapability_RPC_Type(4) // VOLUME_CONDITION before 1.13
)

func setVolumeCondition(resp *csipb.NodeGetVolumeStatsResponse, abnormal bool, message string) {
	var cond []byte
	if abnormal {
		cond = protowire.AppendTag(cond, conditionAbnormalField, protowire.VarintType)
		cond = protowire.AppendVarint(cond, 1)
	}
	if message != "" {
		cond = protowire.AppendTag(cond, conditionMessageField, protowire.BytesType)
		cond = protowire.AppendString(cond, message)
	}
	raw := protowire.AppendTag(nil, statsConditionField, protowire.BytesType)
	raw = protowire.AppendBytes(raw, cond)
	m := resp.ProtoReflect()
	m.SetUnknown(append(m.GetUnknown(), raw...))
}
