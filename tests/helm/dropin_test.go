package helm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/internal/config"
)

// spiffeCSIWorkload is testdata/spiffe-csi-workload.yaml: spiffe-csi's
// example/config/workload-1.yaml, byte for byte (testdata/README.md).
const (
	spiffeCSIWorkload       = "testdata/spiffe-csi-workload.yaml"
	spiffeCSIWorkloadSHA256 = "ed645f3179a545147a671c8f5f92ccffdebcef480ce44c664c748513fa286d60"
)

// deployed is what the agent runs with on a node: the DaemonSet and the
// CSIDriver as rendered, and the config the agent builds from them.
type deployed struct {
	ds     appsv1.DaemonSet
	driver string
	cfg    config.Config
}

// agentOf reads the rendered objects and builds the agent's config the way
// `csi-agent run` does: the ConfigMap's config.yaml, then the DaemonSet's
// flags, then the downward-API environment.
func agentOf(t *testing.T, objs []object) deployed {
	t.Helper()
	var d deployed
	var configYAML string
	for _, o := range objs {
		raw, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		switch o["kind"] {
		case "DaemonSet":
			if err := json.Unmarshal(raw, &d.ds); err != nil {
				t.Fatal(err)
			}
		case "CSIDriver":
			d.driver = dig(o, "metadata")["name"].(string)
		case "ConfigMap":
			configYAML, _ = dig(o, "data")["config.yaml"].(string)
		}
	}
	if d.driver == "" || configYAML == "" || len(d.ds.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("want one CSIDriver, the agent ConfigMap and a one-container DaemonSet in %d objects", len(objs))
	}
	c := d.ds.Spec.Template.Spec.Containers[0]
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(configYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	if len(c.Args) == 0 || c.Args[0] != "run" {
		t.Fatalf("agent args %q, want run first", c.Args)
	}
	args := make([]string, 0, len(c.Args))
	for _, a := range c.Args[1:] {
		if strings.HasPrefix(a, "--config=") {
			a = "--config=" + path
		}
		args = append(args, a)
	}
	env := func(k string) string {
		if k == config.DefaultNodeNameEnv {
			return "node-1"
		}
		return ""
	}
	cfg, err := config.FromArgs(args, env, io.Discard)
	if err != nil {
		t.Fatalf("the agent refuses its deployed config (args %q): %v", args, err)
	}
	d.cfg = cfg
	return d
}

// Every variant deploys a config the agent accepts, whose driver name is
// the CSIDriver's, with probes that check the socket it serves.
func TestDeployedConfigIsConsistent(t *testing.T) {
	cases := append(variants[:len(variants):len(variants)], variant{name: "driver, socket and metrics port", chartOnly: true,
		values: "driverName: ids.example.org\nsocketName: api.sock\nmetrics: {addr: \"0.0.0.0:9999\"}"})
	for _, v := range cases {
		for _, src := range []string{"chart", "kustomize"} {
			if v.chartOnly && src == "kustomize" {
				continue
			}
			t.Run(v.name+"/"+src, func(t *testing.T) {
				objs := kustomize(t, v.components)
				if src == "chart" {
					objs = render(t, parseValues(t, v.values))
				}
				d := agentOf(t, objs)
				if d.cfg.CSI.DriverName != d.driver {
					t.Errorf("agent driver name %q, CSIDriver %q", d.cfg.CSI.DriverName, d.driver)
				}
				if want := "/var/lib/kubelet/plugins/" + d.driver + "/csi.sock"; d.cfg.CSI.Socket != want {
					t.Errorf("CSI socket %s, want %s", d.cfg.CSI.Socket, want)
				}
				c := d.ds.Spec.Template.Spec.Containers[0]
				for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe} {
					if p == nil || p.HTTPGet == nil {
						t.Fatalf("probe %+v, want httpGet", p)
					}
					if got, want := p.HTTPGet.Port.String(), d.cfg.Metrics.Addr[strings.LastIndex(d.cfg.Metrics.Addr, ":")+1:]; got != want {
						t.Errorf("probe port %s, metrics.addr %s", got, d.cfg.Metrics.Addr)
					}
				}
				sc := c.SecurityContext
				if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
					t.Errorf("agent root filesystem is writable: %+v", sc)
				}
			})
		}
	}
}

// Without the metrics listener the chart falls back to exec probes, which
// must name the socket the agent serves, spiffe-csi's name included.
func TestExecProbesFollowTheSocketName(t *testing.T) {
	for _, c := range []struct{ values, socket string }{
		{"metrics: {addr: \"\"}", "/run/csi-agent/sockets/agent.sock"},
		{"metrics: {addr: \"\"}\nspiffeCSI: true", "/run/csi-agent/sockets/spire-agent.sock"},
		{"metrics: {addr: \"\"}\nsocketName: api.sock", "/run/csi-agent/sockets/api.sock"},
	} {
		t.Run(c.values, func(t *testing.T) {
			d := agentOf(t, render(t, parseValues(t, c.values)))
			if got := d.cfg.WorkloadAPI.SocketPath(); got != c.socket {
				t.Fatalf("agent serves %s, want %s", got, c.socket)
			}
			ct := d.ds.Spec.Template.Spec.Containers[0]
			for _, p := range []*corev1.Probe{ct.ReadinessProbe, ct.LivenessProbe} {
				if p == nil || p.Exec == nil {
					t.Fatalf("probe %+v, want exec", p)
				}
				want := []string{"/csi-agent", "healthcheck", "--socket=" + c.socket}
				if strings.Join(p.Exec.Command, " ") != strings.Join(want, " ") {
					t.Errorf("probe %q, want %q", p.Exec.Command, want)
				}
			}
		})
	}
}

// With the switch on (chart value or Kustomize component) a workload
// manifest written for spiffe-csi finds the driver it names and the socket
// its SPIFFE_ENDPOINT_SOCKET names; with it off, it does not.
func TestSpiffeCSIWorkloadFindsDriverAndSocket(t *testing.T) {
	raw, err := os.ReadFile(spiffeCSIWorkload)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != spiffeCSIWorkloadSHA256 {
		t.Fatalf("%s was changed (sha256 %x): it must stay as spiffe-csi publishes it", spiffeCSIWorkload, sum)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(raw, &pod); err != nil {
		t.Fatal(err)
	}
	vol := pod.Spec.Volumes[0]
	mount := pod.Spec.Containers[0].VolumeMounts[0]
	var endpoint string
	for _, e := range pod.Spec.Containers[0].Env {
		if e.Name == "SPIFFE_ENDPOINT_SOCKET" {
			endpoint = e.Value
		}
	}
	if vol.CSI == nil || mount.Name != vol.Name || !strings.HasPrefix(endpoint, "unix://"+mount.MountPath+"/") {
		t.Fatalf("unexpected manifest shape: volume %+v, mount %+v, endpoint %q", vol, mount, endpoint)
	}
	// The driver refuses writable volumes, as spiffe-csi does.
	if vol.CSI.ReadOnly == nil || !*vol.CSI.ReadOnly {
		t.Fatal("the manifest's CSI volume is not readOnly: csi-agent would refuse it")
	}
	socket := strings.TrimPrefix(endpoint, "unix://"+mount.MountPath+"/")
	for _, c := range []struct {
		name  string
		objs  func() []object
		works bool
	}{
		{"chart spiffeCSI", func() []object { return render(t, parseValues(t, "spiffeCSI: true")) }, true},
		{"kustomize spiffe-csi", func() []object { return kustomize(t, []string{"spiffe-csi"}) }, true},
		{"chart default", func() []object { return render(t, nil) }, false},
		{"kustomize default", func() []object { return kustomize(t, nil) }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := agentOf(t, c.objs())
			works := d.driver == vol.CSI.Driver && d.cfg.WorkloadAPI.SocketName == socket
			if works != c.works {
				t.Fatalf("driver %q socket %q for a manifest asking for %q and %q: works=%v, want %v",
					d.driver, d.cfg.WorkloadAPI.SocketName, vol.CSI.Driver, socket, works, c.works)
			}
			// SPIRE's chart's other names of the socket come with the switch.
			if aliases := d.cfg.WorkloadAPI.SocketAliases; works != slices.Equal(aliases, []string{"socket", "api.sock"}) {
				t.Errorf("socket aliases %q with the switch %v", aliases, works)
			}
		})
	}
}

// socketAliases (chart only) reaches the agent's config.
func TestChartSocketAliases(t *testing.T) {
	d := agentOf(t, render(t, parseValues(t, "socketAliases: [socket, api.sock]")))
	if got := d.cfg.WorkloadAPI.SocketAliases; !slices.Equal(got, []string{"socket", "api.sock"}) {
		t.Fatalf("agent socket aliases %q", got)
	}
}

// The example workload passes Pod Security "restricted", by the admission
// plugin's own checks; the agent needs "privileged" and says so.
func TestPodSecurityLevels(t *testing.T) {
	eval, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, level api.Level, tpl corev1.PodTemplateSpec) []string {
		var denied []string
		for _, r := range eval.EvaluatePod(api.LevelVersion{Level: level, Version: api.LatestVersion()}, &tpl.ObjectMeta, &tpl.Spec) {
			if !r.Allowed {
				denied = append(denied, r.ForbiddenReason+" ("+r.ForbiddenDetail+")")
			}
		}
		return denied
	}
	t.Run("example workload is restricted", func(t *testing.T) {
		for _, o := range kustomizeDir(t, kindDir+"/example") {
			if o["kind"] != "Deployment" {
				continue
			}
			var d appsv1.Deployment
			raw, _ := json.Marshal(o)
			if err := json.Unmarshal(raw, &d); err != nil {
				t.Fatal(err)
			}
			if denied := check(t, api.LevelRestricted, d.Spec.Template); len(denied) > 0 {
				t.Fatalf("%s fails Pod Security restricted: %v", d.Name, denied)
			}
			return
		}
		t.Fatal("no Deployment in deploy/kind/example")
	})
	t.Run("agent namespace is privileged", func(t *testing.T) {
		d := agentOf(t, render(t, nil))
		if denied := check(t, api.LevelBaseline, d.ds.Spec.Template); len(denied) == 0 {
			t.Fatal("the agent passes baseline: then its namespace need not be privileged")
		}
		for _, o := range kustomize(t, nil) {
			if o["kind"] == "Namespace" {
				if l := dig(o, "metadata", "labels")["pod-security.kubernetes.io/enforce"]; l != "privileged" {
					t.Fatalf("agent namespace enforces %v, want privileged", l)
				}
				return
			}
		}
		t.Fatal("no Namespace in deploy/kind")
	})
}
