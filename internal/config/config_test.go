package config

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseValid(t *testing.T) {
	cfg, err := Parse([]byte(`
trustDomain: example.org
workloadAPI: {socketDir: /run/x, socketName: spire-agent.sock}
csi: {socket: /var/lib/kubelet/plugins/csi.spiffe.io/csi.sock, driverName: csi.spiffe.io}
nodeName: node-1
kubernetes: {crossCheck: warn, kubelet: {port: 10250, insecureSkipVerify: true}}
ca: {x509SVIDTTL: 30m, jwtSVIDTTL: 2m}
svids:
- spiffeID: /ns/{kubernetes.namespace}/sa/{kubernetes.service_account}
  rules: [{match: {kubernetes.namespace: prod}}, {selectors: ["k8s:pod-label:app:web"]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.TrustDomain != "example.org" || cfg.WorkloadAPI.SocketPath() != "/run/x/spire-agent.sock" {
		t.Errorf("got %+v", cfg)
	}
	if time.Duration(cfg.CA.X509SVIDTTL) != 30*time.Minute || time.Duration(cfg.CA.JWTSVIDTTL) != 2*time.Minute {
		t.Errorf("ttls %v %v", cfg.CA.X509SVIDTTL, cfg.CA.JWTSVIDTTL)
	}
	if !cfg.KubernetesEnabled() || cfg.Kubernetes.CrossCheck != "warn" {
		t.Errorf("kubernetes not as configured: %+v", cfg.Kubernetes)
	}
	if len(cfg.SVIDs) != 1 || len(cfg.SVIDs[0].Rules) != 2 {
		t.Errorf("svids: %+v", cfg.SVIDs)
	}
	// Unset fields keep their defaults.
	if cfg.StateDir != DefaultStateDir || cfg.CSI.KubeletRootDir != DefaultKubeletRootDir {
		t.Errorf("defaults lost: %+v", cfg)
	}
}

func TestMalformedConfigNamesField(t *testing.T) {
	cases := []struct {
		name, yaml, field string
	}{
		{"unknown top-level", "trustDomian: x.org", "trustDomian: unknown field"},
		{"unknown nested", "csi: {driverNme: x}", "csi.driverNme: unknown field"},
		{"unknown in list", "svids: [{spiffeID: /a, rules: [{match: {unix.uid: '1'}, extra: 1}]}]", "svids[0].rules[0].extra: unknown field"},
		{"wrong type", "kubernetes: {kubelet: {port: abc}}", "kubernetes.kubelet.port"},
		{"bad duration", "ca: {x509SVIDTTL: forever}", "x509SVIDTTL"},
		{"bad trust domain", "trustDomain: Example.ORG", "trustDomain"},
		{"trust domain as URI", "trustDomain: spiffe://example.org", "trustDomain"},
		{"relative state dir", "stateDir: state", "stateDir"},
		{"socket name with slash", "workloadAPI: {socketName: a/b.sock}", "workloadAPI.socketName"},
		{"socket path too long", "workloadAPI: {socketDir: /" + strings.Repeat("d", 120) + "}", "workloadAPI.socketDir"},
		{"cross check", "kubernetes: {crossCheck: maybe}", "kubernetes.crossCheck"},
		{"driver name", "nodeName: node1\ncsi: {socket: /p/csi.sock, driverName: Bad_Name}", "csi.driverName"},
		{"csi without node name", "csi: {socket: /p/csi.sock}", "nodeName"},
		{"kubelet port", "nodeName: node1\ncsi: {socket: /p/csi.sock}\nkubernetes: {kubelet: {port: 70000}}", "kubernetes.kubelet.port"},
		{"cert without key", "nodeName: node1\ncsi: {socket: /p/csi.sock}\nkubernetes: {kubelet: {clientCertFile: /c}}", "kubernetes.kubelet.clientCertFile"},
		{"kubelet unverifiable", "kubernetes: {enabled: true, crossCheck: 'off'}", "nodeName"},
		{"bare off", "kubernetes: {crossCheck: off}", "kubernetes.crossCheck: want a string, got a boolean (YAML reads a bare on/off"},
		{"upstream half", "ca: {upstreamKeyFile: /k}", "ca.upstreamCertFile"},
		{"ttl too short", "ca: {jwtSVIDTTL: 1s}", "ca.jwtSVIDTTL"},
		{"not yaml", "trustDomain: [", "YAML"},
		{"top level list", "- a\n- b", "(top level)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml))
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil {
				t.Fatalf("accepted %q", tc.yaml)
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("error %q does not name %q", err, tc.field)
			}
		})
	}
}

func TestFromArgs(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(file, []byte("trustDomain: file.org\nstateDir: /from/file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := FromArgs([]string{"--config", file, "--trust-domain", "flag.org", "--x509-svid-ttl", "20m"}, env(map[string]string{"MY_NODE_NAME": "n1", "HOST_PROC": "/host/proc"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TrustDomain != "flag.org" {
		t.Errorf("flag did not override file: %q", cfg.TrustDomain)
	}
	if cfg.StateDir != "/from/file" {
		t.Errorf("file value lost: %q", cfg.StateDir)
	}
	if cfg.NodeName != "n1" || cfg.ProcRoot != "/host/proc" {
		t.Errorf("env fallbacks not applied: node %q proc %q", cfg.NodeName, cfg.ProcRoot)
	}
	if time.Duration(cfg.CA.X509SVIDTTL) != 20*time.Minute {
		t.Errorf("ttl %v", cfg.CA.X509SVIDTTL)
	}

	if _, err := FromArgs([]string{"--kubelet-port", "x"}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "kubelet-port") {
		t.Errorf("bad flag value: %v", err)
	}
	if _, err := FromArgs([]string{"--config", filepath.Join(dir, "missing.yaml")}, env(nil), io.Discard); err == nil {
		t.Error("missing config file accepted")
	}
	if _, err := FromArgs([]string{"extra"}, env(nil), io.Discard); err == nil {
		t.Error("stray argument accepted")
	}
}

func TestDevMode(t *testing.T) {
	cfg, err := FromArgs([]string{"--dev", "--trust-domain", "dev.org"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Dev || cfg.StateDir == DefaultStateDir || cfg.WorkloadAPI.SocketDir == DefaultSocketDir {
		t.Errorf("dev dirs not applied: %+v", cfg)
	}
	// An explicit flag still wins over dev defaults.
	if cfg.TrustDomain != "dev.org" {
		t.Errorf("flag lost in dev mode: %q", cfg.TrustDomain)
	}
	if cfg.CSI.Socket != "" {
		t.Errorf("CSI on in dev mode: %q", cfg.CSI.Socket)
	}
	if cfg.KubernetesEnabled() {
		t.Error("kubernetes attestation on in dev mode")
	}
	if len(cfg.SVIDs) != 1 || cfg.SVIDs[0].Rules[0].Match["unix.uid"] == "" {
		t.Errorf("dev rule missing: %+v", cfg.SVIDs)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("trustDomain: example.org\ncsi: {socket: /a}\n"))
	f.Add([]byte("svids: [{spiffeID: /a, rules: [{match: {unix.uid: '0'}}]}]"))
	f.Add([]byte("ca: {x509SVIDTTL: 1h}"))
	f.Add([]byte("kubernetes: {kubelet: {port: 1}}"))
	f.Add([]byte("{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		_ = cfg.Validate()
	})
}
