package helm

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/config"
)

// caModeOf is the --ca-mode the agent DaemonSet runs with.
func caModeOf(t *testing.T, objs []object) string {
	t.Helper()
	for _, o := range objs {
		if o["kind"] != "DaemonSet" {
			continue
		}
		var ds appsv1.DaemonSet
		convert(t, o, &ds)
		for _, a := range ds.Spec.Template.Spec.Containers[0].Args {
			if m, ok := strings.CutPrefix(a, "--ca-mode="); ok {
				return m
			}
		}
	}
	t.Fatal("the agent DaemonSet has no --ca-mode")
	return ""
}

func convert(t *testing.T, o object, into any) {
	t.Helper()
	raw, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, into); err != nil {
		t.Fatal(err)
	}
}

// objKey is normalize's key of an object; ns "" for a cluster-scoped one.
func objKey(kind, ns, name string) string {
	var n any // normalize prints a missing namespace as fmt prints nil
	if ns != "" {
		n = ns
	}
	return fmt.Sprintf("%s %s/%s", kind, n, name)
}

// clusterObjects are what only cluster mode deploys.
var clusterObjects = []string{
	objKey("Deployment", namespace, "csi-agent-controller"), objKey("ServiceAccount", namespace, "csi-agent-controller"),
	objKey("ClusterRole", "", "csi-agent-controller"), objKey("ClusterRoleBinding", "", "csi-agent-controller"),
	objKey("Role", namespace, "csi-agent-controller"), objKey("RoleBinding", namespace, "csi-agent-controller"),
	objKey("ClusterRole", "", "csi-agent-cluster-ca"), objKey("ClusterRoleBinding", "", "csi-agent-cluster-ca"),
	objKey("Role", namespace, "csi-agent-jwks"), objKey("RoleBinding", namespace, "csi-agent-jwks"),
}

// Cluster mode is the default; the upstream-files and self-managed modes
// (component or value) deploy no controller and none of its RBAC.
func TestCAModes(t *testing.T) {
	want := map[string]string{
		"default": "cluster", "spiffe-csi": "cluster", "kubelet-nodes-proxy": "cluster",
		"cluster with spiffe-csi and nodes-proxy": "cluster", "bundle-endpoint": "cluster",
		"upstream-ca": "upstream", "all": "upstream",
		"self-managed": "selfManaged", "self-managed by its old value": "selfManaged",
	}
	for _, v := range variants {
		for _, src := range []string{"chart", "kustomize"} {
			t.Run(v.name+"/"+src, func(t *testing.T) {
				objs := kustomize(t, v.components)
				if src == "chart" {
					objs = render(t, parseValues(t, v.values))
				}
				mode := caModeOf(t, objs)
				if mode != want[v.name] {
					t.Fatalf("--ca-mode=%s, want %s", mode, want[v.name])
				}
				got := normalize(t, objs)
				for _, k := range clusterObjects {
					if _, ok := got[k]; ok != (mode == "cluster") {
						t.Errorf("%s deployed: %v, in mode %s", k, ok, mode)
					}
				}
			})
		}
	}
	t.Run("chart: controller elsewhere", func(t *testing.T) {
		got := normalize(t, render(t, parseValues(t, "controller: {enabled: false}")))
		for _, k := range clusterObjects {
			_, ok := got[k]
			if agentSide := !strings.Contains(k, "controller"); ok != agentSide {
				t.Errorf("%s deployed: %v; with controller.enabled false only the agents' RBAC stays", k, ok)
			}
		}
	})
}

// controllerOf is the controller Deployment of the rendered objects.
func controllerOf(t *testing.T, objs []object) appsv1.Deployment {
	t.Helper()
	for _, o := range objs {
		if o["kind"] == "Deployment" && dig(o, "metadata")["name"] == "csi-agent-controller" {
			var d appsv1.Deployment
			convert(t, o, &d)
			return d
		}
	}
	t.Fatal("no Deployment csi-agent-controller")
	return appsv1.Deployment{}
}

// The controller: two replicas spread over nodes, the agents' config, the
// downward API for its lease identity, HTTP probes on the config's metrics
// port, and a pod that passes Pod Security "restricted".
func TestControllerDeployment(t *testing.T) {
	eval, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		objs     func(t *testing.T) []object
		replicas int32
	}{
		{"kustomize", func(t *testing.T) []object { return kustomize(t, nil) }, 2},
		{"chart", func(t *testing.T) []object { return render(t, nil) }, 2},
		{"chart, 3 replicas", func(t *testing.T) []object { return render(t, parseValues(t, "controller: {replicas: 3}")) }, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs := c.objs(t)
			d := controllerOf(t, objs)
			agent := agentOf(t, objs)
			spec := d.Spec.Template.Spec
			if d.Spec.Replicas == nil || *d.Spec.Replicas != c.replicas {
				t.Errorf("replicas %v, want %d", d.Spec.Replicas, c.replicas)
			}
			if spec.ServiceAccountName != "csi-agent-controller" {
				t.Errorf("service account %q", spec.ServiceAccountName)
			}
			if len(spec.Containers) != 1 {
				t.Fatalf("%d containers", len(spec.Containers))
			}
			ct := spec.Containers[0]
			if ct.Image != agent.ds.Spec.Template.Spec.Containers[0].Image {
				t.Errorf("controller image %s, agent image %s: one image", ct.Image, agent.ds.Spec.Template.Spec.Containers[0].Image)
			}
			if got := strings.Join(append(ct.Command, ct.Args...), " "); got != "/csi-agent controller --config=/etc/csi-agent/config.yaml" {
				t.Errorf("command %q", got)
			}
			var cfgMounted bool
			for _, m := range ct.VolumeMounts {
				for _, v := range spec.Volumes {
					if v.Name == m.Name && v.ConfigMap != nil && v.ConfigMap.Name == "csi-agent-config" && m.MountPath == "/etc/csi-agent" && m.ReadOnly {
						cfgMounted = true
					}
				}
			}
			if !cfgMounted || len(spec.Volumes) != 1 {
				t.Errorf("want only the agents' ConfigMap, read-only at /etc/csi-agent: %+v %+v", spec.Volumes, ct.VolumeMounts)
			}
			env := map[string]string{}
			for _, e := range ct.Env {
				if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
					env[e.Name] = e.ValueFrom.FieldRef.FieldPath
				}
			}
			if env["POD_NAME"] != "metadata.name" || env["POD_NAMESPACE"] != "metadata.namespace" {
				t.Errorf("downward API env %v", env)
			}
			// The controller accepts the config it is deployed with, as
			// `csi-agent controller` builds it, the downward API filled in.
			fieldValues := map[string]string{"metadata.name": "csi-agent-controller-0", "metadata.namespace": namespace, "spec.nodeName": "node-1"}
			ctlCfg, err := config.ControllerFromArgs(controllerArgs(t, objs, ct.Args), func(k string) string { return fieldValues[env[k]] }, io.Discard)
			if err != nil {
				t.Fatalf("the controller refuses its deployed config: %v", err)
			}
			if ctlCfg.TrustDomain != agent.cfg.TrustDomain || ctlCfg.Controller.Namespace != namespace || ctlCfg.Controller.Identity != "csi-agent-controller-0" {
				t.Errorf("controller trust domain %q, namespace %q, identity %q", ctlCfg.TrustDomain, ctlCfg.Controller.Namespace, ctlCfg.Controller.Identity)
			}
			if want := []string{namespace + ":csi-agent"}; !slices.Equal(ctlCfg.Controller.AgentServiceAccounts, want) {
				t.Errorf("controller signs for %q, want the agents' service account %q", ctlCfg.Controller.AgentServiceAccounts, want)
			}
			port := agent.cfg.Metrics.Addr[strings.LastIndex(agent.cfg.Metrics.Addr, ":")+1:]
			for _, p := range []*corev1.Probe{ct.ReadinessProbe, ct.LivenessProbe} {
				if p == nil || p.HTTPGet == nil || p.HTTPGet.Port.String() != port {
					t.Errorf("probe %+v, want httpGet on metrics port %s", p, port)
				}
			}
			if p := ct.ReadinessProbe; p != nil && p.HTTPGet != nil && p.HTTPGet.Path != "/readyz" {
				t.Errorf("readiness path %s", p.HTTPGet.Path)
			}
			if p := ct.LivenessProbe; p != nil && p.HTTPGet != nil && p.HTTPGet.Path != "/livez" {
				t.Errorf("liveness path %s", p.HTTPGet.Path)
			}
			sc := ct.SecurityContext
			if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil ||
				!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Errorf("container security context %+v", sc)
			}
			aff := spec.Affinity
			if aff == nil || aff.PodAntiAffinity == nil || len(aff.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution) != 1 ||
				aff.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution[0].PodAffinityTerm.TopologyKey != "kubernetes.io/hostname" {
				t.Errorf("want a preferred anti-affinity per node: %+v", aff)
			}
			var denied []string
			for _, r := range eval.EvaluatePod(api.LevelVersion{Level: api.LevelRestricted, Version: api.LatestVersion()}, &d.Spec.Template.ObjectMeta, &spec) {
				if !r.Allowed {
					denied = append(denied, r.ForbiddenReason+" ("+r.ForbiddenDetail+")")
				}
			}
			if len(denied) > 0 {
				t.Errorf("the controller fails Pod Security restricted: %v", denied)
			}
		})
	}
}

// controllerArgs are the controller's args after its subcommand, with the
// config file the rendered ConfigMap's, written out.
func controllerArgs(t *testing.T, objs []object, args []string) []string {
	t.Helper()
	var configYAML string
	for _, o := range objs {
		if o["kind"] == "ConfigMap" {
			configYAML, _ = dig(o, "data")["config.yaml"].(string)
		}
	}
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(configYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	if len(args) == 0 || args[0] != "controller" {
		t.Fatalf("controller args %q, want controller first", args)
	}
	var out []string
	for _, a := range args[1:] {
		if strings.HasPrefix(a, "--config=") {
			a = "--config=" + path
		}
		out = append(out, a)
	}
	return out
}

// rule is one RBAC rule in a comparable form.
type rule struct{ groups, resources, names, verbs string }

func (r rule) String() string {
	return fmt.Sprintf("%s %s %s: %s", r.groups, r.resources, r.names, r.verbs)
}

func rulesOf(rs []rbacv1.PolicyRule) []string {
	var out []string
	for _, r := range rs {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				verbs := slices.Clone(r.Verbs)
				sort.Strings(verbs)
				names := slices.Clone(r.ResourceNames)
				sort.Strings(names)
				out = append(out, rule{g, res, strings.Join(names, ","), strings.Join(verbs, ",")}.String())
			}
		}
	}
	sort.Strings(out)
	return out
}

// The RBAC of cluster mode is CLUSTER.md's list, rule for rule: the signer
// verbs on our signer names only, the Secret by name but for create, and
// each role bound to its one service account.
func TestClusterRBACIsLeastPrivilege(t *testing.T) {
	signers := func(names ...string) string { sort.Strings(names); return strings.Join(names, ",") }
	want := map[string][]rule{
		objKey("ClusterRole", "", "csi-agent-cluster-ca"): {
			{"certificates.k8s.io", "certificatesigningrequests", "", "create,get,list,watch"},
			{"certificates.k8s.io", "clustertrustbundles", "", "get,list,watch"},
		},
		objKey("Role", namespace, "csi-agent-jwks"): {
			{"", "configmaps", cluster.JWKSConfigMap, "get,list,watch"},
		},
		objKey("ClusterRole", "", "csi-agent-controller"): {
			{"certificates.k8s.io", "certificatesigningrequests", "", "get,list,watch"},
			{"certificates.k8s.io", "certificatesigningrequests/approval", "", "update"},
			{"certificates.k8s.io", "certificatesigningrequests/status", "", "update"},
			{"certificates.k8s.io", "signers", signers(cluster.IntermediateSigner, cluster.JWTKeySigner), "approve,sign"},
			{"certificates.k8s.io", "signers", cluster.SVIDSigner, "attest,sign"},
			{"certificates.k8s.io", "clustertrustbundles", "", "create,get,list,update,watch"},
			{"certificates.k8s.io", "podcertificaterequests", "", "get,list,watch"},
			{"certificates.k8s.io", "podcertificaterequests/status", "", "update"},
			{"", "nodes", "", "get,list,watch"},
			{"", "pods", "", "get,list,watch"},
			{"", "serviceaccounts", "", "get"},
			{"", "events", "", "create,patch"},
			{"events.k8s.io", "events", "", "create,patch"},
		},
		objKey("Role", namespace, "csi-agent-controller"): {
			{"", "secrets", "", "create"},
			{"", "secrets", cluster.RootSecret, "get,list,update,watch"},
			{"", "configmaps", "", "create,get,list,update,watch"},
			{"coordination.k8s.io", "leases", "", "create,get,update"},
		},
	}
	bindings := map[string]string{
		objKey("ClusterRoleBinding", "", "csi-agent-cluster-ca"): "ClusterRole csi-agent-cluster-ca -> csi-agent/csi-agent",
		objKey("RoleBinding", namespace, "csi-agent-jwks"):       "Role csi-agent-jwks -> csi-agent/csi-agent",
		objKey("ClusterRoleBinding", "", "csi-agent-controller"): "ClusterRole csi-agent-controller -> csi-agent/csi-agent-controller",
		objKey("RoleBinding", namespace, "csi-agent-controller"): "Role csi-agent-controller -> csi-agent/csi-agent-controller",
	}
	for _, src := range []string{"chart", "kustomize"} {
		t.Run(src, func(t *testing.T) {
			objs := kustomize(t, nil)
			if src == "chart" {
				objs = render(t, nil)
			}
			got := normalize(t, objs)
			for k, rules := range want {
				o, ok := got[k]
				if !ok {
					t.Errorf("no %s", k)
					continue
				}
				var role rbacv1.ClusterRole // a Role's rules read the same
				convert(t, o, &role)
				var w []string
				for _, r := range rules {
					w = append(w, r.String())
				}
				sort.Strings(w)
				if g := rulesOf(role.Rules); !reflect.DeepEqual(g, w) {
					t.Errorf("%s rules:\n  %s\nwant:\n  %s", k, strings.Join(g, "\n  "), strings.Join(w, "\n  "))
				}
			}
			for k, w := range bindings {
				var b rbacv1.RoleBinding
				convert(t, got[k], &b)
				var subjects []string
				for _, s := range b.Subjects {
					subjects = append(subjects, s.Kind+" "+s.Namespace+"/"+s.Name)
				}
				if g := fmt.Sprintf("%s %s -> %s", b.RoleRef.Kind, b.RoleRef.Name, strings.TrimPrefix(strings.Join(subjects, ","), "ServiceAccount ")); g != w || len(subjects) != 1 {
					t.Errorf("%s binds %s, want %s", k, g, w)
				}
			}
		})
	}
}

// The podCertificate example: its fields are k8s.io/api's (strict
// decoding), it asks our SVID signer for an ECDSA P-256 key and projects
// the ClusterTrustBundle the controller publishes for the deployed trust
// domain, and it passes Pod Security "restricted".
func TestPodCertificateExample(t *testing.T) {
	dir := kindDir + "/example/pod-certificate"
	raw, err := os.ReadFile(dir + "/workload.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, doc := range strings.Split(string(raw), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil || meta.Kind != "Deployment" {
			continue
		}
		var d appsv1.Deployment
		if err := yaml.UnmarshalStrict([]byte(doc), &d); err != nil {
			t.Fatalf("the example is not a valid Deployment of k8s.io/api: %v", err)
		}
		found = true
		td := agentOf(t, kustomize(t, nil)).cfg.TrustDomain
		var cert *corev1.PodCertificateProjection
		var ctb *corev1.ClusterTrustBundleProjection
		mounted := map[string]bool{}
		for _, m := range d.Spec.Template.Spec.Containers[0].VolumeMounts {
			mounted[m.Name] = m.ReadOnly
		}
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Projected == nil {
				continue
			}
			if !mounted[v.Name] {
				t.Errorf("projected volume %s is not mounted read-only", v.Name)
			}
			for _, s := range v.Projected.Sources {
				if s.PodCertificate != nil {
					cert = s.PodCertificate
				}
				if s.ClusterTrustBundle != nil {
					ctb = s.ClusterTrustBundle
				}
			}
		}
		if cert == nil || cert.SignerName != cluster.SVIDSigner || cert.KeyType != "ECDSAP256" || cert.CredentialBundlePath == "" {
			t.Errorf("podCertificate projection %+v, want signer %s, ECDSAP256 and a credential bundle", cert, cluster.SVIDSigner)
		}
		if ctb == nil || ctb.SignerName == nil || *ctb.SignerName != cluster.SVIDSigner || ctb.LabelSelector == nil ||
			!reflect.DeepEqual(ctb.LabelSelector.MatchLabels, map[string]string{cluster.TrustDomainLabel: td}) || ctb.Path == "" {
			t.Errorf("clusterTrustBundle projection %+v, want signer %s selected by %s=%s", ctb, cluster.SVIDSigner, cluster.TrustDomainLabel, td)
		}
		eval, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range eval.EvaluatePod(api.LevelVersion{Level: api.LevelRestricted, Version: api.LatestVersion()}, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec) {
			if !r.Allowed {
				t.Errorf("fails Pod Security restricted: %s (%s)", r.ForbiddenReason, r.ForbiddenDetail)
			}
		}
	}
	if !found {
		t.Fatal("no Deployment in " + dir)
	}
	// And it builds as the kustomization it is.
	if objs := kustomizeDir(t, dir); len(objs) != 3 {
		t.Errorf("%s builds %d objects, want 3", dir, len(objs))
	}
}

// The bundle endpoint as deployed: the controller serves it where its
// Service sends peers, with the SPIFFE ID peers are told to expect, and
// the agents get the federation list.
func TestBundleEndpointDeployment(t *testing.T) {
	for _, c := range []struct {
		name string
		objs func(t *testing.T) []object
		port int32
	}{
		{"kustomize", func(t *testing.T) []object { return kustomize(t, []string{"bundle-endpoint"}) }, 8443},
		{"chart", func(t *testing.T) []object {
			return render(t, parseValues(t, "federation: {bundleEndpoint: {enabled: true}}"))
		}, 8443},
		{"chart, another port", func(t *testing.T) []object {
			return render(t, parseValues(t, "federation: {bundleEndpoint: {enabled: true, port: 9443}}"))
		}, 9443},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs := c.objs(t)
			d := controllerOf(t, objs)
			ct := d.Spec.Template.Spec.Containers[0]
			cfg, err := config.ControllerFromArgs(controllerArgs(t, objs, ct.Args), func(k string) string {
				return map[string]string{config.PodNameEnv: "ctl-0", config.PodNamespaceEnv: namespace}[k]
			}, io.Discard)
			if err != nil {
				t.Fatalf("the controller refuses its deployed config: %v", err)
			}
			td, err := cfg.TrustDomainID()
			if err != nil {
				t.Fatal(err)
			}
			o, on := cfg.ControllerBundleEndpointOptions(td)
			if !on || o.Profile != "https_spiffe" || o.SPIFFEID.String() != "spiffe://"+td.Name()+"/csi-agent/bundle-endpoint" {
				t.Fatalf("bundle endpoint %+v (on %v), want https_spiffe as spiffe://%s/csi-agent/bundle-endpoint", o, on, td.Name())
			}
			if want := fmt.Sprintf("0.0.0.0:%d", c.port); cfg.Controller.BundleEndpoint.Address != want {
				t.Errorf("controller listens on %s, want %s", cfg.Controller.BundleEndpoint.Address, want)
			}
			var svc *corev1.Service
			for _, obj := range objs {
				if obj["kind"] == "Service" && dig(obj, "metadata")["name"] == "csi-agent-bundle-endpoint" {
					svc = new(corev1.Service)
					convert(t, obj, svc)
				}
			}
			if svc == nil {
				t.Fatal("no Service csi-agent-bundle-endpoint")
			}
			for k, v := range svc.Spec.Selector {
				if d.Spec.Template.Labels[k] != v {
					t.Errorf("Service selects %s=%s, the controller pods have %v", k, v, d.Spec.Template.Labels)
				}
			}
			if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != c.port {
				t.Fatalf("Service ports %+v, want %d", svc.Spec.Ports, c.port)
			}
			var target int32
			for _, p := range ct.Ports {
				if p.Name == svc.Spec.Ports[0].TargetPort.String() {
					target = p.ContainerPort
				}
			}
			if target != c.port {
				t.Errorf("Service targets container port %q = %d, want the controller's %d", svc.Spec.Ports[0].TargetPort.String(), target, c.port)
			}
		})
	}
	// Off by default, and the agents' federation list comes from the values.
	objs := render(t, parseValues(t, "federation: {trustDomains: [{trustDomain: spire.example, path: /b.json}]}"))
	for _, obj := range objs {
		if obj["kind"] == "Service" {
			t.Errorf("a Service rendered with the bundle endpoint off: %v", dig(obj, "metadata")["name"])
		}
	}
	if fed := agentOf(t, objs).cfg.Federation; len(fed) != 1 || fed[0].TrustDomain != "spire.example" || fed[0].Path != "/b.json" {
		t.Errorf("agent federation %+v, want spire.example from /b.json", fed)
	}
}
