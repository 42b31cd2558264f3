package k8s

import (
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"

	"github.com/csi-agent/csi-agent/attestor"
)

// PodAttributes are the pod-level facts of an API server pod object, mapped
// exactly as for a Workload API caller in that pod. There are no container
// fields: an API pod names no calling process. Status images appear only
// once the kubelet has reported them.
func PodAttributes(p *corev1.Pod) (attestor.Attributes, error) {
	// Through JSON, because the kubelet's pod list is the same JSON: one
	// mapping, field for field the one the attestor uses.
	body, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encode pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	var q pod
	if err := json.Unmarshal(body, &q); err != nil {
		return nil, fmt.Errorf("decode pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return q.podAttributes(""), nil
}
