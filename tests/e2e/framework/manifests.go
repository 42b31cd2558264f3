package framework

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Kustomize builds a kustomization directory into objects.
func Kustomize(dir string) ([]*unstructured.Unstructured, error) {
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize %s: %w", dir, err)
	}
	var objs []*unstructured.Unstructured
	for _, r := range m.Resources() {
		mp, err := r.Map()
		if err != nil {
			return nil, err
		}
		objs = append(objs, &unstructured.Unstructured{Object: mp})
	}
	return objs, nil
}

// Applier applies objects with server-side apply and strict field
// validation, so an unknown or misplaced field is an error, not a warning.
type Applier struct {
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func NewApplier(cfg *rest.Config) (*Applier, error) {
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &Applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disco))}, nil
}

// Apply applies one object; dryRun asks the API server to run every
// admission and validation step and persist nothing.
func (a *Applier) Apply(ctx context.Context, obj *unstructured.Unstructured, dryRun bool) error {
	gvk := obj.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err)
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		ri = a.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	}
	data, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	force := true
	opts := metav1.PatchOptions{FieldManager: "csi-agent-e2e", Force: &force, FieldValidation: "Strict"}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	if _, err := ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data, opts); err != nil {
		mode := "apply"
		if dryRun {
			mode = "server-side dry-run"
		}
		return fmt.Errorf("%s %s %s/%s: %w", mode, gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
	}
	return nil
}

// Find returns the object of the given kind and name.
func Find(objs []*unstructured.Unstructured, kind, name string) (*unstructured.Unstructured, error) {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o, nil
		}
	}
	return nil, fmt.Errorf("no %s %q in the manifests", kind, name)
}

// runsPods tells whether applying the object for real would need a controller
// this node does not run; such objects are only dry-run.
func runsPods(o *unstructured.Unstructured) bool {
	switch o.GetKind() {
	case "DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job", "Pod":
		return true
	}
	return false
}

// AgentConfig returns the agent's config.yaml from the deploy ConfigMap with
// the e2e's overrides applied (top-level keys replaced).
func AgentConfig(objs []*unstructured.Unstructured, overrides map[string]any) (map[string]any, error) {
	cm, err := Find(objs, "ConfigMap", AgentConfigMap)
	if err != nil {
		return nil, err
	}
	raw, _, _ := unstructured.NestedString(cm.Object, "data", "config.yaml")
	if raw == "" {
		return nil, fmt.Errorf("ConfigMap %s has no config.yaml", AgentConfigMap)
	}
	cfg := map[string]any{}
	if err := yaml.Unmarshal([]byte(raw), &cfg); err != nil {
		return nil, fmt.Errorf("ConfigMap %s config.yaml: %w", AgentConfigMap, err)
	}
	MergeConfig(cfg, overrides)
	return cfg, nil
}

// MergeConfig replaces top-level keys of an agent config with overrides; a
// map value is merged one level deep, a nil value deletes the key.
func MergeConfig(cfg, overrides map[string]any) {
	for k, v := range overrides {
		if v == nil {
			delete(cfg, k)
			continue
		}
		if sub, ok := v.(map[string]any); ok {
			if cur, ok := cfg[k].(map[string]any); ok {
				for sk, sv := range sub {
					cur[sk] = sv
				}
				continue
			}
		}
		cfg[k] = v
	}
}

// decodeObject decodes the object of kind and name into out, its text
// rewritten by paths when that is set.
func decodeObject(objs []*unstructured.Unstructured, kind, name string, paths *strings.Replacer, out any) error {
	u, err := Find(objs, kind, name)
	if err != nil {
		return err
	}
	raw, err := json.Marshal(u.Object)
	if err != nil {
		return err
	}
	if paths != nil {
		raw = []byte(paths.Replace(string(raw)))
	}
	return json.Unmarshal(raw, out)
}

// StaticAgentPod turns the DaemonSet's pod template into a static pod, the
// way this node can run it without a DaemonSet controller: a static (mirror)
// pod may not use a service account, a ConfigMap or a projected token, so
// those become hostPath volumes at the same mount paths, holding the same
// config and a token from the TokenRequest API. Paths are rewritten with
// the replacer so the agent sees the node's directories at their host paths.
// env is added to every container (e.g. where the API server is).
func StaticAgentPod(objs []*unstructured.Unstructured, configDir, tokenDir string, paths *strings.Replacer, env []corev1.EnvVar) ([]byte, error) {
	var ds appsv1.DaemonSet
	if err := decodeObject(objs, "DaemonSet", AgentDaemonSet, paths, &ds); err != nil {
		return nil, err
	}
	return staticPod(ds.ObjectMeta, ds.Spec.Template, configDir, tokenDir, env)
}

// StaticControllerPod turns the controller Deployment's pod template into a
// static pod as StaticAgentPod does, on the node's network (a pod here has
// only loopback, and the API server listens on the node's): its metrics
// and probes move to 127.0.0.1:metricsPort, off the agent's port.
func StaticControllerPod(objs []*unstructured.Unstructured, configDir, tokenDir string, env []corev1.EnvVar, metricsPort int) ([]byte, error) {
	var d appsv1.Deployment
	if err := decodeObject(objs, "Deployment", ControllerDeployment, nil, &d); err != nil {
		return nil, err
	}
	tmpl := d.Spec.Template
	tmpl.Spec.HostNetwork = true
	tmpl.Spec.Affinity = nil
	for i := range tmpl.Spec.Containers {
		c := &tmpl.Spec.Containers[i]
		for j := range c.Ports {
			c.Ports[j].ContainerPort = int32(metricsPort)
		}
		for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
			if p != nil && p.HTTPGet != nil {
				p.HTTPGet.Host = "127.0.0.1"
				p.HTTPGet.Port = intstr.FromInt32(int32(metricsPort))
			}
		}
	}
	return staticPod(d.ObjectMeta, tmpl, configDir, tokenDir, env)
}

// staticPod makes a static pod of a pod template whose config comes from
// the agent's ConfigMap and whose API access from its service account.
func staticPod(meta metav1.ObjectMeta, tmpl corev1.PodTemplateSpec, configDir, tokenDir string, env []corev1.EnvVar) ([]byte, error) {
	spec := tmpl.Spec
	spec.ServiceAccountName = ""
	spec.DeprecatedServiceAccount = ""
	no := false
	spec.AutomountServiceAccountToken = &no
	dirType := corev1.HostPathDirectory
	for i, v := range spec.Volumes {
		if v.ConfigMap != nil && v.ConfigMap.Name == AgentConfigMap {
			spec.Volumes[i].VolumeSource = corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: configDir, Type: &dirType}}
		}
	}
	spec.Volumes = append(spec.Volumes, corev1.Volume{Name: "sa-token", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: tokenDir, Type: &dirType}}})
	for i := range spec.Containers {
		spec.Containers[i].VolumeMounts = append(spec.Containers[i].VolumeMounts, corev1.VolumeMount{
			Name: "sa-token", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true,
		})
		spec.Containers[i].Env = append(spec.Containers[i].Env, env...)
	}
	pod := corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: meta.Name, Namespace: meta.Namespace, Labels: tmpl.Labels, Annotations: tmpl.Annotations},
		Spec:       spec,
	}
	return yaml.Marshal(pod)
}

// PodFromDeployment returns a pod made from a Deployment's pod template, for
// a node without a Deployment controller.
func PodFromDeployment(objs []*unstructured.Unstructured, name string) (*corev1.Pod, error) {
	var d appsv1.Deployment
	if err := decodeObject(objs, "Deployment", name, nil, &d); err != nil {
		return nil, err
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: d.Name, Namespace: d.Namespace, Labels: d.Spec.Template.Labels},
		Spec:       d.Spec.Template.Spec,
	}, nil
}

// UpstreamCAOverlay writes a kustomization that adds the upstream-ca
// component, with a fresh CA, on top of deployDir; it returns its directory.
func UpstreamCAOverlay(deployDir, tmp string) (string, error) {
	comp := filepath.Join(tmp, "upstream-ca")
	if err := os.MkdirAll(comp, 0o755); err != nil {
		return "", err
	}
	src, err := os.ReadFile(filepath.Join(deployDir, "components", "upstream-ca", "kustomization.yaml"))
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(comp, "kustomization.yaml"), src, 0o644); err != nil {
		return "", err
	}
	ca, err := newCA("csi-agent-e2e-upstream")
	if err != nil {
		return "", err
	}
	if err := ca.write(comp, "tls"); err != nil {
		return "", err
	}
	overlay := filepath.Join(tmp, "overlay")
	if err := os.MkdirAll(overlay, 0o755); err != nil {
		return "", err
	}
	// kustomize takes only relative paths to other kustomizations.
	rel, err := filepath.Rel(overlay, deployDir)
	if err != nil {
		return "", err
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%q]\ncomponents: [../upstream-ca]\n", rel)
	return overlay, os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o644)
}

// ComponentOverlay writes a kustomization that adds the deploy component
// deployDir/components/<name> on top of deployDir; it returns its directory.
func ComponentOverlay(deployDir, tmp, name string) (string, error) {
	overlay := filepath.Join(tmp, name+"-overlay")
	if err := os.MkdirAll(overlay, 0o755); err != nil {
		return "", err
	}
	// kustomize takes only relative paths to other kustomizations.
	rel, err := filepath.Rel(overlay, deployDir)
	if err != nil {
		return "", err
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%q]\ncomponents: [%q]\n",
		rel, filepath.Join(rel, "components", name))
	return overlay, os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o644)
}
