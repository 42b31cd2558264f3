package config

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/clusterca"
)

// CA modes (ca.mode).
const (
	CAModeSelfManaged = "selfManaged"
	CAModeUpstream    = "upstream"
	CAModeCluster     = "cluster"
)

// Cluster mode defaults.
const (
	DefaultClusterNamespace       = "csi-agent"
	DefaultClusterIntermediateTTL = 6 * time.Hour
	// MinClusterIntermediateTTL is the shortest expirationSeconds the API
	// server accepts on a CertificateSigningRequest.
	MinClusterIntermediateTTL = 10 * time.Minute
	MaxClusterIntermediateTTL = 24 * time.Hour
)

// ClusterCA configures cluster mode: the intermediate and the JWT-SVID key
// are certified by the csi-agent controller through the Kubernetes API.
type ClusterCA struct {
	// Kubeconfig is the API server client configuration; empty: in-cluster
	// (the pod's projected service account token).
	Kubeconfig string `json:"kubeconfig"`
	// Namespace is the controller's, which holds the JWKS ConfigMap.
	Namespace          string   `json:"namespace"`
	IntermediateSigner string   `json:"intermediateSigner"`
	JWTKeySigner       string   `json:"jwtKeySigner"`
	BundleSigner       string   `json:"bundleSigner"`
	IntermediateTTL    Duration `json:"intermediateTTL"`
}

// DefaultClusterCA is ca.cluster with every default filled in.
func DefaultClusterCA() ClusterCA {
	return ClusterCA{
		Namespace:          DefaultClusterNamespace,
		IntermediateSigner: cluster.IntermediateSigner,
		JWTKeySigner:       cluster.JWTKeySigner,
		BundleSigner:       cluster.SVIDSigner,
		IntermediateTTL:    Duration(DefaultClusterIntermediateTTL),
	}
}

// CAMode is the mode in use: ca.mode, or, when it is empty, upstream when
// the upstream files are set and self-managed otherwise.
func (c *Config) CAMode() string {
	switch {
	case c.CA.Mode != "":
		return c.CA.Mode
	case c.CA.UpstreamCertFile != "" || c.CA.UpstreamKeyFile != "":
		return CAModeUpstream
	}
	return CAModeSelfManaged
}

// validateCA checks ca.mode, ca.jwtIssuer and ca.cluster.
func (c *Config) validateCA() error {
	files := c.CA.UpstreamCertFile != "" || c.CA.UpstreamKeyFile != ""
	switch c.CAMode() {
	case CAModeSelfManaged:
		if files {
			return errors.New("ca.mode: selfManaged cannot be combined with upstreamCertFile/upstreamKeyFile (use upstream, or leave mode empty)")
		}
	case CAModeUpstream:
		if c.CA.UpstreamCertFile == "" || c.CA.UpstreamKeyFile == "" {
			return errors.New("ca.mode: upstream needs upstreamCertFile and upstreamKeyFile")
		}
	case CAModeCluster:
		if files {
			return errors.New("ca.mode: cluster cannot be combined with upstreamCertFile/upstreamKeyFile: the cluster holds the root")
		}
		if c.NodeName == "" {
			return fmt.Errorf("nodeName: required in cluster mode, it names the node in the certificate requests (set --node-name or $%s)", DefaultNodeNameEnv)
		}
		if err := c.CA.Cluster.validate(); err != nil {
			return err
		}
	default:
		return fmt.Errorf("ca.mode: %q is not one of %s, %s, %s", c.CA.Mode, CAModeSelfManaged, CAModeUpstream, CAModeCluster)
	}
	if iss := c.CA.JWTIssuer; iss != "" {
		u, err := url.Parse(iss)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("ca.jwtIssuer: must be an https:// (or, for tests, http://) URL without query or fragment, as OIDC issuers are, got %q", iss)
		}
	}
	return nil
}

func (cc ClusterCA) validate() error {
	if errs := validation.IsDNS1123Label(cc.Namespace); len(errs) > 0 {
		return fmt.Errorf("ca.cluster.namespace: %q is not a namespace name: %s", cc.Namespace, strings.Join(errs, "; "))
	}
	for _, s := range []struct{ field, v string }{
		{"ca.cluster.intermediateSigner", cc.IntermediateSigner},
		{"ca.cluster.jwtKeySigner", cc.JWTKeySigner},
		{"ca.cluster.bundleSigner", cc.BundleSigner},
	} {
		if err := checkSignerName(s.v); err != nil {
			return fmt.Errorf("%s: %w", s.field, err)
		}
	}
	if cc.IntermediateSigner == cc.JWTKeySigner {
		return errors.New("ca.cluster.jwtKeySigner: must differ from intermediateSigner")
	}
	if d := time.Duration(cc.IntermediateTTL); d < MinClusterIntermediateTTL || d > MaxClusterIntermediateTTL {
		return fmt.Errorf("ca.cluster.intermediateTTL: must be between %s (the API server's minimum) and %s, got %s",
			MinClusterIntermediateTTL, MaxClusterIntermediateTTL, d)
	}
	return nil
}

// checkSignerName requires a Kubernetes signer name: a DNS subdomain, a
// slash, and a path.
func checkSignerName(s string) error {
	domain, path, ok := strings.Cut(s, "/")
	if !ok || path == "" {
		return fmt.Errorf("%q is not a signer name (example.com/name)", s)
	}
	if errs := validation.IsDNS1123Subdomain(domain); len(errs) > 0 {
		return fmt.Errorf("%q: domain: %s", s, strings.Join(errs, "; "))
	}
	return nil
}

// ClusterCAOptions configure the Kubernetes client of cluster mode.
func (c *Config) ClusterCAOptions(td spiffeid.TrustDomain) clusterca.Options {
	cc := c.CA.Cluster
	return clusterca.Options{
		TrustDomain:        td,
		NodeName:           c.NodeName,
		Namespace:          cc.Namespace,
		IntermediateSigner: cc.IntermediateSigner,
		JWTKeySigner:       cc.JWTKeySigner,
		BundleSigner:       cc.BundleSigner,
	}
}
