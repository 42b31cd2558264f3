package config

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestControllerDefaults(t *testing.T) {
	p := writeConfig(t, "trustDomain: example.org\n")
	cfg, err := ControllerFromArgs([]string{"--config", p, "--kubeconfig", "/k"}, env(map[string]string{PodNamespaceEnv: "spire", PodNameEnv: "ctl-0"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Controller
	if c.Namespace != "spire" || c.Identity != "ctl-0" || c.Kubeconfig != "/k" {
		t.Errorf("namespace %q identity %q kubeconfig %q: want spire, ctl-0 (from the environment) and /k", c.Namespace, c.Identity, c.Kubeconfig)
	}
	if c.RootSecret != cluster.RootSecret || c.IntermediateSigner != cluster.IntermediateSigner ||
		c.JWTKeySigner != cluster.JWTKeySigner || c.SVIDSigner != cluster.SVIDSigner {
		t.Errorf("names: %+v", c)
	}
	for _, d := range []struct {
		name      string
		got, want time.Duration
	}{
		{"rootTTL", time.Duration(c.RootTTL), 8760 * time.Hour},
		{"rootActivationDelay", time.Duration(c.RootActivationDelay), 10 * time.Minute},
		{"maxIntermediateTTL", time.Duration(c.MaxIntermediateTTL), 24 * time.Hour},
		{"defaultIntermediateTTL", time.Duration(c.DefaultIntermediateTTL), 6 * time.Hour},
		{"leaseDuration", time.Duration(c.LeaseDuration), 15 * time.Second},
		{"renewDeadline", time.Duration(c.RenewDeadline), 10 * time.Second},
		{"retryPeriod", time.Duration(c.RetryPeriod), 2 * time.Second},
		{"podCertificates.maxTTL", time.Duration(c.PodCertificates.MaxTTL), 24 * time.Hour},
	} {
		if d.got != d.want {
			t.Errorf("%s = %s, want %s", d.name, d.got, d.want)
		}
	}
	if len(c.AgentServiceAccounts) != 1 || c.AgentServiceAccounts[0] != "csi-agent:csi-agent" || !c.PodCertificatesEnabled() {
		t.Errorf("agentServiceAccounts %v podCertificates %v", c.AgentServiceAccounts, c.PodCertificatesEnabled())
	}
	o := cfg.ControllerOptions(mustTD(t, cfg))
	if o.Namespace != "spire" || o.JWKSConfigMap != cluster.JWKSConfigMap || o.RootTTL != 8760*time.Hour || o.RootPoll <= 0 || o.RetainPrevious != 24*time.Hour {
		t.Errorf("ControllerOptions: %+v", o)
	}
	l := cfg.LeaderOptions()
	if l.Lease != cluster.Lease || l.Namespace != "spire" || l.Identity != "ctl-0" || l.LeaseDuration != 15*time.Second {
		t.Errorf("LeaderOptions: %+v", l)
	}

	// Without the environment: csi-agent and the host name.
	cfg, err = ControllerFromArgs([]string{"--config", p}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if cfg.Controller.Namespace != DefaultClusterNamespace || cfg.Controller.Identity != host {
		t.Errorf("namespace %q identity %q, want %s and the host name %q", cfg.Controller.Namespace, cfg.Controller.Identity, DefaultClusterNamespace, host)
	}
}

func TestControllerConfigured(t *testing.T) {
	p := writeConfig(t, `
trustDomain: example.org
controller:
  namespace: sec
  identity: me
  rootTTL: 100h
  rootActivationDelay: 2s
  maxIntermediateTTL: 1h
  defaultIntermediateTTL: 30m
  agentServiceAccounts: ["a:b", "c:d"]
  podCertificates: {enabled: false, refreshFraction: 0.01}
  oidc: {addr: "127.0.0.1:0", issuer: "https://oidc.example.org"}
`)
	cfg, err := ControllerFromArgs([]string{"--config", p}, env(map[string]string{PodNamespaceEnv: "ignored"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Controller
	if c.PodCertificates.RefreshFraction != 0.01 || cfg.PodCertOptions(mustTD(t, cfg), nil, nil).RefreshFraction != 0.01 {
		t.Errorf("refreshFraction %v", c.PodCertificates.RefreshFraction)
	}
	if c.Namespace != "sec" || c.Identity != "me" || time.Duration(c.RootActivationDelay) != 2*time.Second || len(c.AgentServiceAccounts) != 2 || c.PodCertificatesEnabled() {
		t.Fatalf("configured values lost: %+v", c)
	}
}

func TestControllerInvalid(t *testing.T) {
	for _, tt := range []struct {
		name, yaml, field string
	}{
		{"namespace", "controller: {namespace: Not_A_Name}", "controller.namespace"},
		{"root secret", "controller: {rootSecret: 'a/b'}", "controller.rootSecret"},
		{"service account", "controller: {agentServiceAccounts: [csi-agent]}", "controller.agentServiceAccounts[0]"},
		{"signer", "controller: {svidSigner: nodomain}", "controller.svidSigner"},
		{"signers equal", "controller: {jwtKeySigner: csi-agent.spiffe.io/node-intermediate}", "controller.jwtKeySigner: must differ"},
		{"root TTL short", "controller: {rootTTL: 30m}", "controller.rootTTL: must be at least"},
		{"root TTL vs intermediates", "controller: {rootTTL: 48h}", "controller.rootTTL: 48h0m0s is too short"},
		{"root TTL vs pod certificates", "controller: {rootTTL: 100h, maxIntermediateTTL: 1h, defaultIntermediateTTL: 1h, podCertificates: {maxTTL: 40h}}", "controller.rootTTL: 100h0m0s is too short"},
		{"intermediate TTL below the API minimum", "controller: {maxIntermediateTTL: 5m}", "controller.maxIntermediateTTL"},
		{"default over max", "controller: {defaultIntermediateTTL: 12h, maxIntermediateTTL: 6h}", "controller.defaultIntermediateTTL: 12h0m0s exceeds"},
		{"renew deadline", "controller: {renewDeadline: 20s}", "controller.renewDeadline"},
		{"retry period", "controller: {retryPeriod: 9s}", "controller.retryPeriod"},
		{"oidc addr", "controller: {oidc: {addr: nope, issuer: 'https://x.org'}}", "controller.oidc.addr"},
		{"oidc issuer missing", "controller: {oidc: {addr: ':8443'}}", "controller.oidc.issuer"},
		{"oidc issuer query", "controller: {oidc: {addr: ':8443', issuer: 'https://x.org/?a=1'}}", "controller.oidc.issuer"},
		{"refresh fraction", "controller: {podCertificates: {refreshFraction: 1}}", "controller.podCertificates.refreshFraction"},
		{"oidc TLS half", "controller: {oidc: {certFile: /c}}", "controller.oidc.certFile"},
		{"bundle endpoint", "controller: {bundleEndpoint: {address: ':8443', profile: https_web}}", "controller.bundleEndpoint.certFile: profile https_web needs certFile and keyFile"},
		{"unknown field", "controller: {rootTTl: 1h}", "controller.rootTTl: unknown field"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := writeConfig(t, tt.yaml)
			_, err := ControllerFromArgs([]string{"--config", p}, env(nil), io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.field) {
				t.Fatalf("error %v, want one naming %q", err, tt.field)
			}
			// The agents share the file but not the section: a mistake
			// there stops the controller, never the agent on every node.
			if tt.name != "unknown field" {
				cfg, perr := Parse([]byte(tt.yaml))
				if perr != nil {
					t.Fatal(perr)
				}
				cfg.NodeName = "node-a"
				if err := cfg.Validate(); err != nil {
					t.Fatalf("the agent's Validate: %v, want nil (the controller section is not the agent's)", err)
				}
			}
		})
	}
}

// The controller reads no node settings: a file whose agent sections want a
// node name (CSI on, cluster mode) loads without one.
func TestControllerNeedsNoNodeName(t *testing.T) {
	yaml := "trustDomain: example.org\ncsi: {socket: /csi/csi.sock}\nca: {mode: cluster}\n"
	p := writeConfig(t, yaml)
	if _, err := ControllerFromArgs([]string{"--config", p}, env(map[string]string{PodNameEnv: "ctl-0"}), io.Discard); err != nil {
		t.Fatalf("controller without a node name: %v", err)
	}
	cfg, err := Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "nodeName") {
		t.Fatalf("the agent's Validate without a node name: %v, want an error naming nodeName", err)
	}
	// The agent's sections are not the controller's to refuse.
	p = writeConfig(t, "trustDomain: example.org\nworkloadAPI: {socketName: a/b}\nlogging: {format: json}\n")
	if _, err := ControllerFromArgs([]string{"--config", p}, env(nil), io.Discard); err != nil {
		t.Fatalf("controller with a bad agent section: %v", err)
	}
	// What both read, both check.
	p = writeConfig(t, "trustDomain: example.org\nlogging: {format: xml}\n")
	if _, err := ControllerFromArgs([]string{"--config", p}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "logging.format") {
		t.Fatalf("controller with logging.format xml: %v, want an error naming it", err)
	}
}

func TestControllerBundleEndpointFlag(t *testing.T) {
	p := writeConfig(t, "trustDomain: example.org\ncontroller: {bundleEndpoint: {refreshHint: 10m}}\n")
	cfg, err := ControllerFromArgs([]string{"--config", p, "--bundle-endpoint-address", "0.0.0.0:8443"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o, ok := cfg.ControllerBundleEndpointOptions(mustTD(t, cfg))
	if !ok || cfg.Controller.BundleEndpoint.Address != "0.0.0.0:8443" || o.Profile != "https_spiffe" || o.RefreshHint != 10*time.Minute {
		t.Fatalf("bundle endpoint options %+v (on %v): want 0.0.0.0:8443, https_spiffe and the file's refresh hint", o, ok)
	}
	if _, err := ControllerFromArgs([]string{"--config", p, "--bundle-endpoint-address", "8443"}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "controller.bundleEndpoint.address") {
		t.Fatalf("a bad address: %v, want an error naming controller.bundleEndpoint.address", err)
	}
}

func mustTD(t *testing.T, c Config) spiffeid.TrustDomain {
	t.Helper()
	td, err := c.TrustDomainID()
	if err != nil {
		t.Fatal(err)
	}
	return td
}
