package k8s

import (
	"encoding/json"
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"strconv"
	"strings"
	"time"

	"github.com/csi-agent/csi-agent/attestor"
)

// Values of field.K8sContainerType.
const (
	ContainerTypeContainer = "container"
	ContainerTypeInit      = "init"
	ContainerTypeSidecar   = "sidecar" // init container with restartPolicy Always
	ContainerTypeEphemeral = "ephemeral"
)

// podList is one parsed kubelet answer, indexed by pod UID.
type podList struct {
	gen       uint64    // increases with every successful fetch
	fetchedAt time.Time // when its request started
	byUID     map[string]*pod
}

// pod holds only the fields attestation reads: decoding a node's full pod
// list into v1.Pod objects costs several times more for nothing.
type pod struct {
	Metadata struct {
		Name            string            `json:"name"`
		Namespace       string            `json:"namespace"`
		UID             string            `json:"uid"`
		Labels          map[string]string `json:"labels"`
		OwnerReferences []ownerReference  `json:"ownerReferences"`
	} `json:"metadata"`
	Spec struct {
		NodeName            string          `json:"nodeName"`
		ServiceAccountName  string          `json:"serviceAccountName"`
		Containers          []specContainer `json:"containers"`
		InitContainers      []specContainer `json:"initContainers"`
		EphemeralContainers []specContainer `json:"ephemeralContainers"`
	} `json:"spec"`
	Status struct {
		ContainerStatuses          []containerStatus `json:"containerStatuses"`
		InitContainerStatuses      []containerStatus `json:"initContainerStatuses"`
		EphemeralContainerStatuses []containerStatus `json:"ephemeralContainerStatuses"`
	} `json:"status"`
}

type ownerReference struct {
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	UID        string `json:"uid"`
	Controller *bool  `json:"controller"`
}

type specContainer struct {
	Name          string `json:"name"`
	Image         string `json:"image"`
	RestartPolicy string `json:"restartPolicy"`
}

type containerStatus struct {
	Name        string `json:"name"`
	ContainerID string `json:"containerID"`
	Image       string `json:"image"`
	ImageID     string `json:"imageID"`
}

func parsePodList(body []byte) (*podList, error) {
	var raw struct {
		Items []*pod `json:"items"`
	}
	if err := json.Unmarshal(body, &raw); err != nil {
		return nil, fmt.Errorf("decode kubelet pod list: %w", err)
	}
	l := &podList{byUID: make(map[string]*pod, len(raw.Items))}
	for _, p := range raw.Items {
		if p == nil || p.Metadata.UID == "" {
			continue
		}
		if _, dup := l.byUID[p.Metadata.UID]; dup {
			// Never happens with a real kubelet; if it does, nobody can tell which is right.
			return nil, fmt.Errorf("kubelet pod list has pod UID %s twice", p.Metadata.UID)
		}
		l.byUID[p.Metadata.UID] = p
	}
	return l, nil
}

// containerMatch is the container of a pod that runs the caller.
type containerMatch struct {
	name, image, imageID, kind string
}

// container finds the container whose runtime ID ("containerd://<id>") is id.
func (p *pod) container(id string) (containerMatch, bool) {
	if id == "" {
		return containerMatch{}, false
	}
	lists := []struct {
		statuses []containerStatus
		specs    []specContainer
		kind     string
	}{
		{p.Status.ContainerStatuses, p.Spec.Containers, ContainerTypeContainer},
		{p.Status.InitContainerStatuses, p.Spec.InitContainers, ContainerTypeInit},
		{p.Status.EphemeralContainerStatuses, p.Spec.EphemeralContainers, ContainerTypeEphemeral},
	}
	for _, l := range lists {
		for _, s := range l.statuses {
			if runtimeID(s.ContainerID) != id {
				continue
			}
			m := containerMatch{name: s.Name, image: s.Image, imageID: s.ImageID, kind: l.kind}
			spec, ok := specByName(l.specs, s.Name)
			if ok && m.image == "" {
				m.image = spec.Image
			}
			if ok && l.kind == ContainerTypeInit && spec.RestartPolicy == "Always" {
				m.kind = ContainerTypeSidecar
			}
			return m, true
		}
	}
	return containerMatch{}, false
}

func runtimeID(s string) string {
	if _, id, ok := strings.Cut(s, "://"); ok {
		return id
	}
	return s
}

func specByName(specs []specContainer, name string) (specContainer, bool) {
	for _, s := range specs {
		if s.Name == name {
			return s, true
		}
	}
	return specContainer{}, false
}

func (p *pod) serviceAccount() string { return p.Spec.ServiceAccountName }

// podAttributes are the facts true of every process in the pod.
func (p *pod) podAttributes(nodeName string) attestor.Attributes {
	a := attestor.Attributes{}
	a.Set(field.K8sNamespace, p.Metadata.Namespace)
	a.Set(field.K8sPodName, p.Metadata.Name)
	a.Set(field.K8sPodUID, p.Metadata.UID)
	if sa := p.serviceAccount(); sa != "" {
		a.Set(field.K8sServiceAccount, sa)
	}
	if p.Spec.NodeName != "" {
		nodeName = p.Spec.NodeName
	}
	if nodeName != "" {
		a.Set(field.K8sNodeName, nodeName)
	}
	for k, v := range p.Metadata.Labels {
		a.Set(field.K8sPodLabelPrefix+k, v)
	}
	for _, o := range p.Metadata.OwnerReferences {
		if o.Controller != nil && *o.Controller {
			a.Set(field.K8sPodOwnerKind, o.Kind)
			a.Set(field.K8sPodOwnerName, o.Name)
			a.Set(field.K8sPodOwnerUID, o.UID)
			break
		}
	}
	if images := podImages(p.Spec.Containers, p.Status.ContainerStatuses); len(images) > 0 {
		a.Set(field.K8sPodImage, images...)
	}
	a.Set(field.K8sPodImageCount, strconv.Itoa(len(p.Spec.Containers)))
	if images := podImages(p.Spec.InitContainers, p.Status.InitContainerStatuses); len(images) > 0 {
		a.Set(field.K8sPodInitImage, images...)
	}
	a.Set(field.K8sPodInitImageCount, strconv.Itoa(len(p.Spec.InitContainers)))
	return a
}

// podImages lists each image as written in the spec and as the runtime
// reports it (resolved name and digest), once each, so a rule can name
// either "nginx:1.27" or "docker.io/library/nginx@sha256:…".
func podImages(specs []specContainer, statuses []containerStatus) []string {
	var out []string
	seen := map[string]bool{"": true}
	add := func(s string) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	for _, s := range specs {
		add(s.Image)
	}
	for _, s := range statuses {
		add(s.Image)
		add(s.ImageID)
	}
	return out
}

func addContainerAttributes(a attestor.Attributes, id string, m containerMatch) {
	a.Set(field.K8sContainerID, id)
	a.Set(field.K8sContainerName, m.name)
	a.Set(field.K8sContainerType, m.kind)
	if m.image != "" {
		a.Set(field.K8sContainerImage, m.image)
	}
	if m.imageID != "" {
		a.Set(field.K8sContainerImageID, m.imageID)
	}
}
