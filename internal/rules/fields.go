package rules

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Attribute field names, as the attestors set them.
const (
	fieldUnixPID                = "unix.pid"
	fieldUnixUID                = "unix.uid"
	fieldUnixGID                = "unix.gid"
	fieldUnixUser               = "unix.user"
	fieldUnixGroup              = "unix.group"
	fieldUnixSupplementaryGID   = "unix.supplementary_gid"
	fieldUnixSupplementaryGroup = "unix.supplementary_group"
	fieldUnixPath               = "unix.path"
	fieldUnixSHA256             = "unix.sha256"
	fieldK8sNamespace           = "kubernetes.namespace"
	fieldK8sServiceAccount      = "kubernetes.service_account"
	fieldK8sPodName             = "kubernetes.pod_name"
	fieldK8sPodUID              = "kubernetes.pod_uid"
	fieldK8sPodLabelPrefix      = "kubernetes.pod_label."
	fieldK8sNodeName            = "kubernetes.node_name"
	fieldK8sPodOwnerKind        = "kubernetes.pod_owner_kind"
	fieldK8sPodOwnerName        = "kubernetes.pod_owner_name"
	fieldK8sPodOwnerUID         = "kubernetes.pod_owner_uid"
	fieldK8sContainerName       = "kubernetes.container_name"
	fieldK8sContainerID         = "kubernetes.container_id"
	fieldK8sContainerImage      = "kubernetes.container_image"
	fieldK8sContainerImageID    = "kubernetes.container_image_id"
	fieldK8sContainerType       = "kubernetes.container_type"
	fieldK8sPodImage            = "kubernetes.pod_image"
	fieldK8sPodImageCount       = "kubernetes.pod_image_count"
	fieldK8sPodInitImage        = "kubernetes.pod_init_image"
	fieldK8sPodInitImageCount   = "kubernetes.pod_init_image_count"
)

var knownFields = map[string]bool{
	fieldUnixPID:                true,
	fieldUnixUID:                true,
	fieldUnixGID:                true,
	fieldUnixUser:               true,
	fieldUnixGroup:              true,
	fieldUnixSupplementaryGID:   true,
	fieldUnixSupplementaryGroup: true,
	fieldUnixPath:               true,
	fieldUnixSHA256:             true,
	fieldK8sNamespace:           true,
	fieldK8sServiceAccount:      true,
	fieldK8sPodName:             true,
	fieldK8sPodUID:              true,
	fieldK8sNodeName:            true,
	fieldK8sPodOwnerKind:        true,
	fieldK8sPodOwnerName:        true,
	fieldK8sPodOwnerUID:         true,
	fieldK8sContainerName:       true,
	fieldK8sContainerID:         true,
	fieldK8sContainerImage:      true,
	fieldK8sContainerImageID:    true,
	fieldK8sContainerType:       true,
	fieldK8sPodImage:            true,
	fieldK8sPodImageCount:       true,
	fieldK8sPodInitImage:        true,
	fieldK8sPodInitImageCount:   true,
}

// checkField reports whether name is a field an attestor can set: one of the
// fixed names, or kubernetes.pod_label.<key> with a valid Kubernetes label key.
func checkField(name string) error {
	if knownFields[name] {
		return nil
	}
	if key, ok := strings.CutPrefix(name, fieldK8sPodLabelPrefix); ok {
		if err := checkLabelKey(key); err != nil {
			return fmt.Errorf("field %q: %w", name, err)
		}
		return nil
	}
	return fmt.Errorf("unknown field %q", name)
}

func checkLabelKey(key string) error {
	if errs := validation.IsQualifiedName(key); len(errs) > 0 {
		return fmt.Errorf("invalid label key %q: %s", key, strings.Join(errs, "; "))
	}
	return nil
}
