package helm

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

const (
	chartDir  = "../../deploy/helm/csi-agent"
	kindDir   = "../../deploy/kind"
	namespace = "csi-agent"
	// Stand-ins for an upstream CA: rendering copies them, nothing parses them.
	fakeCert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
	fakeKey  = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
)

// object is one rendered manifest as generic JSON.
type object = map[string]any

// Each switch of the chart against the Kustomize component that does the
// same: the two must render the same objects.
type variant struct {
	name       string
	values     string
	components []string
	chartOnly  bool // no Kustomize counterpart
}

var variants = []variant{
	{name: "default", values: "createNamespace: true"},
	{name: "spiffe-csi", values: "createNamespace: true\nspiffeCSI: true", components: []string{"spiffe-csi"}},
	{name: "upstream-ca", values: upstreamValues, components: []string{"upstream-ca"}},
	{name: "self-managed", values: "createNamespace: true\nca: {mode: selfManaged}", components: []string{"self-managed"}},
	{name: "self-managed by its old value", values: "createNamespace: true\nca: {mode: self}", components: []string{"self-managed"}},
	{name: "kubelet-nodes-proxy", values: "createNamespace: true\nkubelet: {nodesProxyRBAC: true}", components: []string{"kubelet-nodes-proxy"}},
	{name: "all", values: upstreamValues + "\nspiffeCSI: true\nkubelet: {nodesProxyRBAC: true}",
		components: []string{"spiffe-csi", "upstream-ca", "kubelet-nodes-proxy"}},
	{name: "bundle-endpoint", values: "createNamespace: true\nfederation: {bundleEndpoint: {enabled: true}}", components: []string{"bundle-endpoint"}},
	{name: "cluster with spiffe-csi and nodes-proxy", values: "createNamespace: true\nspiffeCSI: true\nkubelet: {nodesProxyRBAC: true}",
		components: []string{"spiffe-csi", "kubelet-nodes-proxy"}},
}

var upstreamValues = fmt.Sprintf("createNamespace: true\nca: {mode: upstream, upstream: {cert: %q, key: %q}}", fakeCert, fakeKey)

func parseValues(t *testing.T, s string) map[string]any {
	t.Helper()
	v := map[string]any{}
	if err := yaml.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("values %q: %v", s, err)
	}
	return v
}

// render is `helm template --namespace csi-agent` with the given values.
func render(t *testing.T, values map[string]any) []object {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	vals, err := chartutil.ToRenderValues(ch, values,
		chartutil.ReleaseOptions{Name: "csi-agent", Namespace: namespace, IsInstall: true, Revision: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	files, err := engine.Render(ch, vals)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var objs []object
	for _, n := range names {
		if !strings.HasSuffix(n, ".yaml") {
			continue
		}
		for _, doc := range strings.Split(files[n], "\n---") {
			o := object{}
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				t.Fatalf("%s: %v\n%s", n, err, doc)
			}
			if len(o) > 0 {
				objs = append(objs, o)
			}
		}
	}
	return objs
}

// kustomize builds deploy/kind with the named components, the way an
// overlay of it would; components needing files get stand-ins.
func kustomize(t *testing.T, components []string) []object {
	t.Helper()
	abs, err := filepath.Abs(kindDir)
	if err != nil {
		t.Fatal(err)
	}
	fs := filesys.MakeFsInMemory()
	if err := copyTree(fs, abs, "/kind"); err != nil {
		t.Fatal(err)
	}
	if err := fs.WriteFile("/kind/components/upstream-ca/tls.crt", []byte(fakeCert)); err != nil {
		t.Fatal(err)
	}
	if err := fs.WriteFile("/kind/components/upstream-ca/tls.key", []byte(fakeKey)); err != nil {
		t.Fatal(err)
	}
	var comps []string
	for _, c := range components {
		comps = append(comps, fmt.Sprintf("%q", "../kind/components/"+c))
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../kind]\ncomponents: [%s]\n", strings.Join(comps, ", "))
	if err := fs.MkdirAll("/overlay"); err != nil {
		t.Fatal(err)
	}
	if err := fs.WriteFile("/overlay/kustomization.yaml", []byte(k)); err != nil {
		t.Fatal(err)
	}
	return build(t, fs, "/overlay")
}

// build runs kustomize on dir of fs.
func build(t *testing.T, fs filesys.FileSystem, dir string) []object {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(fs, dir)
	if err != nil {
		t.Fatal(err)
	}
	var objs []object
	for _, r := range m.Resources() {
		raw, err := r.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		o := object{}
		if err := json.Unmarshal(raw, &o); err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o)
	}
	return objs
}

func copyTree(fs filesys.FileSystem, src, dst string) error {
	return filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		if info.IsDir() {
			return fs.MkdirAll(to)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return fs.WriteFile(to, b)
	})
}

// normalize drops what only Helm adds (its labels, the config checksum that
// rolls pods) and parses config.yaml, so comments and key order in the
// Kustomize ConfigMap do not count; JSON round-trips make numbers alike.
func normalize(t *testing.T, objs []object) map[string]object {
	t.Helper()
	out := map[string]object{}
	for _, o := range objs {
		raw, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		n := object{}
		if err := json.Unmarshal(raw, &n); err != nil {
			t.Fatal(err)
		}
		md, _ := n["metadata"].(map[string]any)
		if labels, ok := md["labels"].(map[string]any); ok {
			delete(labels, "app.kubernetes.io/managed-by")
			delete(labels, "helm.sh/chart")
			if len(labels) == 0 {
				delete(md, "labels")
			}
		}
		if n["kind"] == "DaemonSet" || n["kind"] == "Deployment" {
			tmd := dig(n, "spec", "template", "metadata")
			if ann, ok := tmd["annotations"].(map[string]any); ok {
				delete(ann, "checksum/config")
				if len(ann) == 0 {
					delete(tmd, "annotations")
				}
			}
		}
		if n["kind"] == "Secret" {
			// Kustomize wraps its base64 lines; compare the bytes.
			data, _ := n["data"].(map[string]any)
			for k, v := range data {
				s, _ := v.(string)
				b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(s), ""))
				if err != nil {
					t.Fatalf("Secret data %s: %v", k, err)
				}
				data[k] = string(b)
			}
		}
		if n["kind"] == "ConfigMap" {
			data, _ := n["data"].(map[string]any)
			if s, ok := data["config.yaml"].(string); ok {
				cfg := map[string]any{}
				if err := yaml.Unmarshal([]byte(s), &cfg); err != nil {
					t.Fatalf("config.yaml: %v\n%s", err, s)
				}
				data["config.yaml"] = cfg
			}
		}
		key := fmt.Sprintf("%s %s/%s", n["kind"], md["namespace"], md["name"])
		if _, dup := out[key]; dup {
			t.Fatalf("%s twice", key)
		}
		out[key] = n
	}
	return out
}

func dig(o object, path ...string) map[string]any {
	cur := map[string]any(o)
	for _, p := range path {
		next, _ := cur[p].(map[string]any)
		if next == nil {
			return map[string]any{}
		}
		cur = next
	}
	return cur
}

func keys(m map[string]object) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// The chart deploys what deploy/kind deploys, switch for component. The
// e2e server-side dry-runs (and runs) the Kustomize output on a real API
// server and kubelet, so this equality carries that to the chart.
func TestChartRendersWhatKustomizeBuilds(t *testing.T) {
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			got := normalize(t, render(t, parseValues(t, v.values)))
			want := normalize(t, kustomize(t, v.components))
			if !reflect.DeepEqual(keys(got), keys(want)) {
				t.Fatalf("chart renders %v\nkustomize builds %v", keys(got), keys(want))
			}
			for k, w := range want {
				if g := got[k]; !reflect.DeepEqual(g, w) {
					gj, _ := yaml.Marshal(g)
					wj, _ := yaml.Marshal(w)
					t.Errorf("%s differs\nchart:\n%s\nkustomize:\n%s", k, gj, wj)
				}
			}
		})
	}
}

// helm lint, strict, for each variant and for values a user sets.
func TestChartLints(t *testing.T) {
	extra := []struct{ name, values string }{
		{"no metrics: exec probes", "metrics: {addr: \"\"}"},
		{"controller placed, three replicas", "controller: {replicas: 3, nodeSelector: {kubernetes.io/os: linux}, tolerations: [{key: x, operator: Exists}]}"},
		{"cluster mode, controller elsewhere", "controller: {enabled: false}"},
		{"socket aliases", "socketAliases: [socket, api.sock]"},
		{"federation", `federation:
  bundleEndpoint: {enabled: true, port: 9443, serviceType: LoadBalancer}
  trustDomains: [{trustDomain: spire.example, bundleEndpoint: {url: "https://spire.example:8443", profile: https_web}}]
rules: [{spiffeID: "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", federatesWith: [spire.example], rules: [{selectors: ["k8s:ns:demo"]}]}]`},
		{"rules and placement", `trustDomain: example.org
rules: [{spiffeID: "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", rules: [{selectors: ["k8s:ns:demo"]}]}]
tolerations: []
nodeSelector: {kubernetes.io/os: linux}
resources: {requests: {cpu: 50m}}
kubelet: {caFile: ""}`},
	}
	cases := append([]struct{ name, values string }{}, extra...)
	for _, v := range variants {
		cases = append(cases, struct{ name, values string }{v.name, v.values})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := lint.All(chartDir, parseValues(t, c.values), namespace, true)
			for _, m := range l.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("lint: %s", m)
				}
			}
		})
	}
}

// Values the chart must refuse rather than render something broken.
func TestChartRefusesBadValues(t *testing.T) {
	for _, c := range []struct{ name, values, want string }{
		{"unknown CA mode", "ca: {mode: vault}", "ca.mode must be cluster, selfManaged or upstream"},
		{"cert without key", fmt.Sprintf("ca: {mode: upstream, upstream: {cert: %q}}", fakeCert), "ca.upstream.key is required"},
		{"empty driver name", "driverName: \"\"", "driverName is required"},
		{"bundle endpoint without the controller", "ca: {mode: selfManaged}\nfederation: {bundleEndpoint: {enabled: true}}", "federation.bundleEndpoint.enabled: the controller serves it"},
		{"bundle endpoint, controller elsewhere", "controller: {enabled: false}\nfederation: {bundleEndpoint: {enabled: true}}", "federation.bundleEndpoint.enabled: the controller serves it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ch, err := loader.Load(chartDir)
			if err != nil {
				t.Fatal(err)
			}
			vals, err := chartutil.ToRenderValues(ch, parseValues(t, c.values),
				chartutil.ReleaseOptions{Name: "csi-agent", Namespace: namespace, IsInstall: true}, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = engine.Render(ch, vals)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("render error %v, want one containing %q", err, c.want)
			}
		})
	}
}

// kustomizeDir builds one kustomization directory as it is on disk.
func kustomizeDir(t *testing.T, dir string) []object {
	t.Helper()
	return build(t, filesys.MakeFsOnDisk(), dir)
}
