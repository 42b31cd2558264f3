// Package field is the one catalogue of attestation field names: what the
// attestors set, what rules may match and template on, and which fields
// describe a container rather than its pod.
package field

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Fields the Unix attestor sets from procfs.
const (
	UnixPID                = "unix.pid"
	UnixUID                = "unix.uid"
	UnixUser               = "unix.user"
	UnixGID                = "unix.gid"
	UnixGroup              = "unix.group"
	UnixSupplementaryGID   = "unix.supplementary_gid"
	UnixSupplementaryGroup = "unix.supplementary_group"
	UnixPath               = "unix.path"
	UnixSHA256             = "unix.sha256"
)

// Fields the Kubernetes attestor sets from the kubelet's pod list.
const (
	K8sNamespace         = "kubernetes.namespace"
	K8sServiceAccount    = "kubernetes.service_account"
	K8sPodName           = "kubernetes.pod_name"
	K8sPodUID            = "kubernetes.pod_uid"
	K8sPodLabelPrefix    = "kubernetes.pod_label." // + label key, one field per label
	K8sNodeName          = "kubernetes.node_name"
	K8sPodOwnerKind      = "kubernetes.pod_owner_kind"
	K8sPodOwnerName      = "kubernetes.pod_owner_name"
	K8sPodOwnerUID       = "kubernetes.pod_owner_uid"
	K8sPodImage          = "kubernetes.pod_image"
	K8sPodImageCount     = "kubernetes.pod_image_count"
	K8sPodInitImage      = "kubernetes.pod_init_image"
	K8sPodInitImageCount = "kubernetes.pod_init_image_count"

	// k8sContainerPrefix starts every field that describes the caller's
	// container; the kubelet may list them after the pod itself.
	k8sContainerPrefix = "kubernetes.container_"

	K8sContainerName    = k8sContainerPrefix + "name"
	K8sContainerID      = k8sContainerPrefix + "id"
	K8sContainerImage   = k8sContainerPrefix + "image"
	K8sContainerImageID = k8sContainerPrefix + "image_id"
	K8sContainerType    = k8sContainerPrefix + "type"
)

var known = map[string]bool{
	UnixPID: true, UnixUID: true, UnixUser: true, UnixGID: true, UnixGroup: true,
	UnixSupplementaryGID: true, UnixSupplementaryGroup: true, UnixPath: true, UnixSHA256: true,
	K8sNamespace: true, K8sServiceAccount: true, K8sPodName: true, K8sPodUID: true, K8sNodeName: true,
	K8sPodOwnerKind: true, K8sPodOwnerName: true, K8sPodOwnerUID: true,
	K8sPodImage: true, K8sPodImageCount: true, K8sPodInitImage: true, K8sPodInitImageCount: true,
	K8sContainerName: true, K8sContainerID: true, K8sContainerImage: true, K8sContainerImageID: true,
	K8sContainerType: true,
}

// PodLabel is the field holding the value of the pod label key.
func PodLabel(key string) string { return K8sPodLabelPrefix + key }

// IsContainer reports whether name describes the caller's container (as
// opposed to its pod or process).
func IsContainer(name string) bool { return strings.HasPrefix(name, k8sContainerPrefix) }

// Check reports whether name is a field an attestor can set: one of the fixed
// names, or kubernetes.pod_label.<key> with a valid Kubernetes label key.
func Check(name string) error {
	if known[name] {
		return nil
	}
	if key, ok := strings.CutPrefix(name, K8sPodLabelPrefix); ok {
		if err := CheckLabelKey(key); err != nil {
			return fmt.Errorf("field %q: %w", name, err)
		}
		return nil
	}
	return fmt.Errorf("unknown field %q", name)
}

// CheckLabelKey reports whether key is a valid Kubernetes label key.
func CheckLabelKey(key string) error {
	if errs := validation.IsQualifiedName(key); len(errs) > 0 {
		return fmt.Errorf("invalid label key %q: %s", key, strings.Join(errs, "; "))
	}
	return nil
}
