package csi

import (
	"regexp"
	"sort"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
)

// Volume context keys the kubelet sets for a driver with podInfoOnMount.
const (
	ctxPrefix         = "csi.storage.k8s.io/"
	ctxEphemeral      = ctxPrefix + "ephemeral"
	ctxPodName        = ctxPrefix + "pod.name"
	ctxPodNamespace   = ctxPrefix + "pod.namespace"
	ctxPodUID         = ctxPrefix + "pod.uid"
	ctxServiceAccount = ctxPrefix + "serviceAccount.name"
)

// maxIDLen is the CSI limit for string fields such as volume_id.
const maxIDLen = 128

var (
	// Pod UIDs are UUIDs (API pods) or hex digests (static pods); they become
	// a path segment, so nothing else is accepted.
	podUIDRE = regexp.MustCompile(`^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$`)
	// DNS-1123 label (namespaces) and subdomain (pod and service account names).
	dnsLabelRE     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	dnsSubdomainRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$`)
)

// publishRequest is a NodePublishVolume request that passed validation.
type publishRequest struct {
	volumeID       string
	target         string
	podUID         string
	podNamespace   string
	podName        string
	serviceAccount string
}

// validatePublish checks everything in a NodePublishVolume request that does
// not need the file system. Messages say what the user must change.
func validatePublish(req *csipb.NodePublishVolumeRequest) (publishRequest, error) {
	var p publishRequest
	if err := validateVolumeID(req.GetVolumeId()); err != nil {
		return p, err
	}
	if req.GetTargetPath() == "" {
		return p, invalidf("target_path is missing")
	}
	if err := validateCapability(req.GetVolumeCapability()); err != nil {
		return p, err
	}
	if !req.GetReadonly() {
		return p, invalidf(`the volume is not read-only: set "readOnly: true" on the pod's csi volume (spec.volumes[].csi.readOnly); the Workload API socket is only mounted read-only`)
	}
	vc := req.GetVolumeContext()
	if vc[ctxEphemeral] != "true" {
		return p, invalidf("only CSI ephemeral inline volumes are supported (volume context %q is %q): declare the volume inline in the pod (spec.volumes[].csi), not through a PersistentVolume, and list Ephemeral in the CSIDriver's volumeLifecycleModes", ctxEphemeral, vc[ctxEphemeral])
	}
	var missing []string
	for _, k := range []string{ctxPodUID, ctxPodNamespace, ctxPodName, ctxServiceAccount} {
		if vc[k] == "" {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return p, invalidf("pod info missing from the volume context (%s): set podInfoOnMount: true in the CSIDriver object", strings.Join(missing, ", "))
	}
	var unknown []string
	for k := range vc {
		if !strings.HasPrefix(k, ctxPrefix) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return p, invalidf("unsupported volume attributes %q: remove them from the pod's csi volume (spec.volumes[].csi.volumeAttributes); this driver takes none", unknown)
	}
	p = publishRequest{
		volumeID:       req.GetVolumeId(),
		target:         req.GetTargetPath(),
		podUID:         vc[ctxPodUID],
		podNamespace:   vc[ctxPodNamespace],
		podName:        vc[ctxPodName],
		serviceAccount: vc[ctxServiceAccount],
	}
	switch {
	case !podUIDRE.MatchString(p.podUID):
		return p, invalidf("volume context %s %q is not a pod UID", ctxPodUID, p.podUID)
	case !dnsLabelRE.MatchString(p.podNamespace):
		return p, invalidf("volume context %s %q is not a namespace name", ctxPodNamespace, p.podNamespace)
	case !dnsSubdomainRE.MatchString(p.podName):
		return p, invalidf("volume context %s %q is not a pod name", ctxPodName, p.podName)
	case !dnsSubdomainRE.MatchString(p.serviceAccount):
		return p, invalidf("volume context %s %q is not a service account name", ctxServiceAccount, p.serviceAccount)
	}
	return p, nil
}

func validateVolumeID(id string) error {
	switch {
	case id == "":
		return invalidf("volume_id is missing")
	case len(id) > maxIDLen:
		return invalidf("volume_id is longer than %d bytes", maxIDLen)
	}
	return nil
}

func validateCapability(vc *csipb.VolumeCapability) error {
	if vc == nil {
		return invalidf("volume_capability is missing")
	}
	if vc.GetBlock() != nil {
		return invalidf("block volumes are not supported: use the csi volume as a file system mount (volumeMounts), not volumeDevices")
	}
	m := vc.GetMount()
	if m == nil {
		return invalidf("volume_capability has no access type: only mount volumes are supported")
	}
	if m.GetFsType() != "" {
		return invalidf("fsType %q is not supported: remove fsType from the pod's csi volume", m.GetFsType())
	}
	if len(m.GetMountFlags()) > 0 {
		return invalidf("mount flags %q are not supported: the driver always mounts read-only, nosuid, nodev, noexec", m.GetMountFlags())
	}
	if m.GetVolumeMountGroup() != "" {
		return invalidf("volume_mount_group is not supported")
	}
	switch mode := vc.GetAccessMode().GetMode(); mode {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csipb.VolumeCapability_AccessMode_UNKNOWN:
		return invalidf("volume_capability.access_mode is missing")
	default:
		return invalidf("access mode %s is not supported: the volume is local to one node", mode)
	}
	return nil
}
