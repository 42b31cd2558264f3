package k8s

import (
	"github.com/csi-agent/csi-agent/attestor/field"
	"testing"
)

func TestParsePodListIgnoresWhatItDoesNotNeed(t *testing.T) {
	body := []byte(`{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[
		{"metadata":{"name":"a","namespace":"n","uid":"` + uidN(1) + `","labels":{"x":"y"},"annotations":{"note":"not decoded"},
		  "managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{}}}]},
		 "spec":{"serviceAccountName":"sa","containers":[{"name":"c","image":"i","env":[{"name":"A","value":"B"}],"unknownField":[1,2,3]}]},
		 "status":{"phase":"Running","containerStatuses":[{"name":"c","containerID":"cri-o://` + cidN(1) + `","image":"i","imageID":"i@sha256:00","state":{"running":{}}}]}},
		{"metadata":{"name":"no-uid"}},
		null
	]}`)
	l, err := parsePodList(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.byUID) != 1 {
		t.Fatalf("indexed %d pods, want 1", len(l.byUID))
	}
	p := l.byUID[uidN(1)]
	if p == nil || p.Metadata.Name != "a" || p.serviceAccount() != "sa" || p.Metadata.Labels["x"] != "y" {
		t.Fatalf("pod = %+v", p)
	}
	// The runtime prefix differs per runtime (containerd://, cri-o://, docker://).
	m, ok := p.container(cidN(1))
	if !ok || m.name != "c" || m.kind != ContainerTypeContainer {
		t.Fatalf("container match = %+v, %v", m, ok)
	}
	if _, ok := p.container(""); ok {
		t.Fatal("empty container ID matched")
	}
}

func FuzzParsePodList(f *testing.F) {
	f.Add(podListJSON(f, richPod(), richPodN(1)))
	f.Add([]byte(`{"items":[{"metadata":{"uid":"u"},"status":{"containerStatuses":[{"containerID":"x://y"}]}}]}`))
	f.Add([]byte(`{"items":[{"metadata":{"uid":"u"}},{"metadata":{"uid":"u"}}]}`))
	f.Add([]byte(`{"items":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		l, err := parsePodList(body)
		if err != nil {
			if l != nil {
				t.Fatal("list returned with an error")
			}
			return
		}
		for uid, p := range l.byUID {
			if uid == "" || p.Metadata.UID != uid {
				t.Fatalf("pod indexed under %q has UID %q", uid, p.Metadata.UID)
			}
			a := p.podAttributes("node")
			if got, _ := a.Get(field.K8sPodUID); got != uid {
				t.Fatalf("attributes carry pod UID %q, want %q", got, uid)
			}
			for _, s := range p.Status.ContainerStatuses {
				id := runtimeID(s.ContainerID)
				if m, ok := p.container(id); id != "" && !ok {
					t.Fatalf("container %q listed but not found (%+v)", id, m)
				}
			}
		}
	})
}
