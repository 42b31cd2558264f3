package k8s

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/csi-agent/csi-agent/attestor/field"
)

func TestPodAttributesOfAPIPod(t *testing.T) {
	yes := true
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-0", Namespace: "shop", UID: "pod-uid",
			Labels:          map[string]string{"app": "web"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-x", UID: "rs-uid", Controller: &yes}},
		},
		Spec: corev1.PodSpec{
			NodeName: "n1", ServiceAccountName: "web",
			Containers: []corev1.Container{{Name: "c", Image: "nginx:1.27"}},
		},
	}
	a, err := PodAttributes(p)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		field.K8sNamespace: "shop", field.K8sPodName: "web-0", field.K8sPodUID: "pod-uid",
		field.K8sServiceAccount: "web", field.K8sNodeName: "n1", field.PodLabel("app"): "web",
		field.K8sPodOwnerKind: "ReplicaSet", field.K8sPodOwnerName: "web-x", field.K8sPodOwnerUID: "rs-uid",
		field.K8sPodImage: "nginx:1.27", field.K8sPodImageCount: "1", field.K8sPodInitImageCount: "0",
	}
	for k, v := range want {
		if got, ok := a.Get(k); !ok || got != v {
			t.Errorf("%s = %q, want %q", k, a[k], v)
		}
	}
	for k := range a {
		if field.IsContainer(k) {
			t.Errorf("container field %s set from an API pod", k)
		}
	}
	if len(a) != len(want) {
		keys := make([]string, 0, len(a))
		for k := range a {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		t.Errorf("fields = %v, want exactly %d", keys, len(want))
	}
}
