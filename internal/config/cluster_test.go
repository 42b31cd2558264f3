package config

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

func TestClusterModeDefaults(t *testing.T) {
	cfg, err := Parse([]byte("ca: {mode: cluster}\nnodeName: node-1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	want := ClusterCA{
		Namespace: "csi-agent", IntermediateSigner: cluster.IntermediateSigner, JWTKeySigner: cluster.JWTKeySigner,
		BundleSigner: cluster.SVIDSigner, IntermediateTTL: Duration(6 * time.Hour),
	}
	if cfg.CA.Cluster != want {
		t.Errorf("ca.cluster = %+v, want %+v", cfg.CA.Cluster, want)
	}
	td := spiffeid.RequireTrustDomainFromString(cfg.TrustDomain)
	o := cfg.CAOptions(td)
	if o.Cluster == nil || o.Cluster.NodeName != "node-1" || o.IntermediateTTL != 6*time.Hour {
		t.Errorf("CAOptions in cluster mode: %+v", o)
	}
	co := cfg.ClusterCAOptions(td)
	if co.NodeName != "node-1" || co.Namespace != "csi-agent" || co.BundleSigner != cluster.SVIDSigner || co.TrustDomain != td {
		t.Errorf("ClusterCAOptions: %+v", co)
	}
}

func TestCAModes(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString(DefaultTrustDomain)
	for _, tc := range []struct {
		name, yaml, mode string
		cluster          bool
	}{
		{"default", "trustDomain: cluster.local", CAModeSelfManaged, false},
		{"upstream by files", "ca: {upstreamCertFile: /c, upstreamKeyFile: /k}", CAModeUpstream, false},
		{"upstream named", "ca: {mode: upstream, upstreamCertFile: /c, upstreamKeyFile: /k}", CAModeUpstream, false},
		{"self-managed named", "ca: {mode: selfManaged}", CAModeSelfManaged, false},
		{"cluster", "ca: {mode: cluster, jwtIssuer: 'https://oidc.example.org'}\nnodeName: node-1", CAModeCluster, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml))
			if err != nil {
				t.Fatal(err)
			}
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			if got := cfg.CAMode(); got != tc.mode {
				t.Errorf("CAMode = %q, want %q", got, tc.mode)
			}
			o := cfg.CAOptions(td)
			if (o.Cluster != nil) != tc.cluster || o.JWTIssuer != cfg.CA.JWTIssuer {
				t.Errorf("CAOptions: cluster %v, issuer %q", o.Cluster != nil, o.JWTIssuer)
			}
		})
	}
}

func TestCAModeInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, field string
	}{
		{"unknown mode", "ca: {mode: vault}", "ca.mode"},
		{"cluster without node", "ca: {mode: cluster}", "nodeName"},
		{"cluster with upstream files", "ca: {mode: cluster, upstreamCertFile: /c, upstreamKeyFile: /k}\nnodeName: node-1", "ca.mode"},
		{"self-managed with upstream files", "ca: {mode: selfManaged, upstreamCertFile: /c, upstreamKeyFile: /k}", "ca.mode"},
		{"upstream without files", "ca: {mode: upstream}", "ca.mode"},
		{"bad namespace", "ca: {mode: cluster, cluster: {namespace: Bad_NS}}\nnodeName: node-1", "ca.cluster.namespace"},
		{"bad signer", "ca: {mode: cluster, cluster: {intermediateSigner: nodomain}}\nnodeName: node-1", "ca.cluster.intermediateSigner"},
		{"bad signer domain", "ca: {mode: cluster, cluster: {bundleSigner: 'Not A Domain/x'}}\nnodeName: node-1", "ca.cluster.bundleSigner"},
		{"same signers", "ca: {mode: cluster, cluster: {jwtKeySigner: csi-agent.spiffe.io/node-intermediate}}\nnodeName: node-1", "ca.cluster.jwtKeySigner"},
		{"short intermediate", "ca: {mode: cluster, cluster: {intermediateTTL: 5m}}\nnodeName: node-1", "ca.cluster.intermediateTTL"},
		{"long intermediate", "ca: {mode: cluster, cluster: {intermediateTTL: 48h}}\nnodeName: node-1", "ca.cluster.intermediateTTL"},
		{"issuer not a URL", "ca: {jwtIssuer: oidc.example.org}", "ca.jwtIssuer"},
		{"issuer with query", "ca: {jwtIssuer: 'https://oidc.example.org/?a=b'}", "ca.jwtIssuer"},
		{"issuer ftp", "ca: {jwtIssuer: 'ftp://oidc.example.org'}", "ca.jwtIssuer"},
		{"unknown cluster field", "ca: {mode: cluster, cluster: {kubeConfig: /x}}\nnodeName: node-1", "ca.cluster.kubeConfig: unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml))
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil || !strings.HasPrefix(err.Error(), tc.field) {
				t.Fatalf("got %v, want an error naming %s", err, tc.field)
			}
		})
	}
}

func TestCAModeFlag(t *testing.T) {
	cfg, err := FromArgs([]string{"--ca-mode", "cluster"}, env(map[string]string{DefaultNodeNameEnv: "node-9"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CAMode() != CAModeCluster || cfg.NodeName != "node-9" {
		t.Errorf("mode %q, node %q", cfg.CAMode(), cfg.NodeName)
	}
	if _, err := FromArgs([]string{"--ca-mode", "cluster"}, env(nil), io.Discard); err == nil || !strings.HasPrefix(err.Error(), "nodeName") {
		t.Errorf("cluster mode without a node name: %v", err)
	}
}
