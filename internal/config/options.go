package config

import (
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/attestor/k8s"
	unixattestor "github.com/csi-agent/csi-agent/attestor/unix"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Tunables that are not configuration fields; they live here so that every
// default has one owner.
const (
	DefaultKubeletHost        = "127.0.0.1"
	DefaultKubeletTimeout     = 10 * time.Second
	DefaultMinRefreshInterval = 250 * time.Millisecond
	DefaultRetryBudget        = 30 * time.Second
	// DefaultContainerWait keeps a caller whose container ID the kubelet has
	// not reported yet (postStart hook running) well under a second.
	DefaultContainerWait   = 600 * time.Millisecond
	DefaultMaxPodListAge   = 5 * time.Second
	DefaultPasswdFile      = "/etc/passwd"
	DefaultGroupFile       = "/etc/group"
	DefaultIntermediateTTL = 24 * time.Hour
	DefaultMaxBinarySize   = 128 << 20
)

// The translators below turn a validated Config into each component's
// options; components take them as they are.

// TrustDomainID is the parsed trust domain.
func (c *Config) TrustDomainID() (spiffeid.TrustDomain, error) {
	return spiffeid.TrustDomainFromString(c.TrustDomain)
}

// Rules compiles the configured svids; with none, every attested pod gets
// its namespace/service-account identity.
func (c *Config) Rules(td spiffeid.TrustDomain) (*rules.Set, error) {
	if len(c.SVIDs) == 0 {
		return rules.Default(td), nil
	}
	return rules.Compile(td, c.SVIDs)
}

// CAOptions configure the issuing authority.
// In cluster mode Cluster is set, and the wiring gives it its signer and
// trust source.
func (c *Config) CAOptions(td spiffeid.TrustDomain) ca.Options {
	o := ca.Options{
		TrustDomain:      td,
		StateDir:         filepath.Join(c.StateDir, "ca"),
		UpstreamCertFile: c.CA.UpstreamCertFile,
		UpstreamKeyFile:  c.CA.UpstreamKeyFile,
		X509SVIDTTL:      time.Duration(c.CA.X509SVIDTTL),
		JWTSVIDTTL:       time.Duration(c.CA.JWTSVIDTTL),
		IntermediateTTL:  DefaultIntermediateTTL,
		JWTIssuer:        c.CA.JWTIssuer,
	}
	if c.CAMode() == CAModeCluster {
		o.IntermediateTTL = time.Duration(c.CA.Cluster.IntermediateTTL)
		o.Cluster = &ca.ClusterOptions{NodeName: c.NodeName}
	}
	return o
}

// RecordsDir is where the CSI mount records are kept.
func (c *Config) RecordsDir() string { return filepath.Join(c.StateDir, "records") }

// UnixOptions configure the Unix attestor.
func (c *Config) UnixOptions() unixattestor.Options {
	return unixattestor.Options{
		ProcRoot:       c.ProcRoot,
		WorkloadPath:   c.Unix.WorkloadPath,
		WorkloadSHA256: c.Unix.WorkloadSHA256,
		MaxBinarySize:  c.Unix.MaxBinarySize,
		PasswdFile:     c.Unix.PasswdFile,
		GroupFile:      c.Unix.GroupFile,
	}
}

// KubeletConfig says how the Kubernetes attestor reaches the kubelet.
func (c *Config) KubeletConfig() k8s.KubeletConfig {
	k := c.Kubernetes.Kubelet
	host := k.Host
	if host == "" {
		host = DefaultKubeletHost
	}
	return k8s.KubeletConfig{
		NodeName: c.NodeName, Host: host, Port: k.Port, ReadOnlyPort: k.ReadOnlyPort,
		TokenFile: k.tokenFile(), CAFile: k.caFile(), ClientCertFile: k.ClientCertFile, ClientKeyFile: k.ClientKeyFile,
		InsecureSkipVerify: k.InsecureSkipVerify, SendTokenUnverified: k.SendTokenUnverified, Anonymous: k.Anonymous,
		Timeout: DefaultKubeletTimeout,
	}
}

// tokenFile is the token in use: the default one applies only when no
// other access was chosen.
func (k Kubelet) tokenFile() string {
	if k.TokenFile == DefaultTokenFile && (k.ReadOnlyPort > 0 || k.Anonymous || k.ClientCertFile != "") {
		return ""
	}
	return k.TokenFile
}

// caFile is the CA in use: the default one is dropped where nothing is
// verified (plain HTTP, or skip-verify asked for).
func (k Kubelet) caFile() string {
	if k.CAFile == DefaultKubeletCAFile && (k.ReadOnlyPort > 0 || k.InsecureSkipVerify) {
		return ""
	}
	return k.CAFile
}

// KubernetesOptions configure the Kubernetes attestor over pods and recs
// (nil when the cross-check is off).
func (c *Config) KubernetesOptions(pods k8s.PodLister, recs k8s.Records) k8s.Options {
	return k8s.Options{
		ProcRoot:           c.ProcRoot,
		Pods:               pods,
		Records:            recs,
		CrossCheck:         k8s.CrossCheck(c.Kubernetes.CrossCheck),
		NodeName:           c.NodeName,
		MinRefreshInterval: DefaultMinRefreshInterval,
		RetryBudget:        time.Duration(c.Kubernetes.RetryBudget),
		ContainerWait:      DefaultContainerWait,
		MaxCacheAge:        DefaultMaxPodListAge,
		RequestTimeout:     DefaultKubeletTimeout,
	}
}
