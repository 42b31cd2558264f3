package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/clusterca"
	"github.com/csi-agent/csi-agent/internal/controller"
	"github.com/csi-agent/csi-agent/internal/controller/leader"
	"github.com/csi-agent/csi-agent/internal/podcert"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Controller defaults (`csi-agent controller`). A zero field in the
// controller section means its default.
const (
	DefaultControllerRootTTL              = 8760 * time.Hour
	DefaultControllerActivationDelay      = 10 * time.Minute
	DefaultControllerMaxIntermediateTTL   = 24 * time.Hour
	DefaultControllerLeaseDuration        = 15 * time.Second
	DefaultControllerRenewDeadline        = 10 * time.Second
	DefaultControllerRetryPeriod          = 2 * time.Second
	DefaultControllerPodCertificateMaxTTL = 24 * time.Hour
	DefaultControllerAgentServiceAccount  = "csi-agent:csi-agent"
	// DefaultControllerRootPoll is how often the root Secret is read besides
	// its watch (which an older deployment's RBAC may not allow).
	DefaultControllerRootPoll = 10 * time.Second
	DefaultControllerWorkers  = 2
	// DefaultControllerBundleEndpointSVIDTTL is the life of the bundle
	// endpoint's serving X.509-SVID (https_spiffe), renewed at half life.
	DefaultControllerBundleEndpointSVIDTTL = time.Hour
	// API client rates. Pod certificates get their own client: a burst of
	// pod starts must not delay the Lease renewals and CSRs.
	DefaultControllerQPS   = 20
	DefaultControllerBurst = 40
	DefaultPodCertQPS      = 50
	DefaultPodCertBurst    = 100
	// Environment the Deployment sets from the downward API.
	PodNamespaceEnv = "POD_NAMESPACE"
	PodNameEnv      = "POD_NAME"
)

// Controller is the `controller:` section.
type Controller struct {
	// Kubeconfig is the API client configuration; empty: in-cluster.
	Kubeconfig string `json:"kubeconfig"`
	// Namespace holds the root Secret, the JWKS ConfigMap and the Lease.
	Namespace string `json:"namespace"`
	// Identity is this replica's leader-election identity.
	Identity               string   `json:"identity"`
	RootSecret             string   `json:"rootSecret"`
	RootTTL                Duration `json:"rootTTL"`
	RootActivationDelay    Duration `json:"rootActivationDelay"`
	MaxIntermediateTTL     Duration `json:"maxIntermediateTTL"`
	DefaultIntermediateTTL Duration `json:"defaultIntermediateTTL"`
	// AgentServiceAccounts are the node agents' "namespace:name".
	AgentServiceAccounts []string        `json:"agentServiceAccounts"`
	IntermediateSigner   string          `json:"intermediateSigner"`
	JWTKeySigner         string          `json:"jwtKeySigner"`
	SVIDSigner           string          `json:"svidSigner"`
	LeaseDuration        Duration        `json:"leaseDuration"`
	RenewDeadline        Duration        `json:"renewDeadline"`
	RetryPeriod          Duration        `json:"retryPeriod"`
	OIDC                 OIDC            `json:"oidc"`
	PodCertificates      PodCertificates `json:"podCertificates"`
	// BundleEndpoint is the trust domain's SPIFFE bundle endpoint in
	// cluster mode, served by every replica; the agent's top-level
	// bundleEndpoint, same fields and checks.
	BundleEndpoint BundleEndpoint `json:"bundleEndpoint"`
}

// OIDC configures the discovery endpoint; off while Addr is empty.
type OIDC struct {
	Addr     string `json:"addr"`
	Issuer   string `json:"issuer"`
	CertFile string `json:"certFile"`
	KeyFile  string `json:"keyFile"`
}

// PodCertificates configures PodCertificateRequest signing (issue 9).
type PodCertificates struct {
	// Enabled defaults to true.
	Enabled *bool    `json:"enabled"`
	MaxTTL  Duration `json:"maxTTL"`
	// RefreshFraction of a certificate's life after which the kubelet
	// renews it; 0 means one half.
	RefreshFraction float64 `json:"refreshFraction"`
}

// WithDefaults fills every zero field: namespace from $POD_NAMESPACE, the
// identity from $POD_NAME, else the host name.
func (c Controller) WithDefaults(getenv func(string) string) Controller {
	str := func(v *string, def string) {
		if *v == "" {
			*v = def
		}
	}
	dur := func(v *Duration, def time.Duration) {
		if *v == 0 {
			*v = Duration(def)
		}
	}
	ns := getenv(PodNamespaceEnv)
	if ns == "" {
		ns = DefaultClusterNamespace
	}
	str(&c.Namespace, ns)
	if c.Identity == "" {
		if c.Identity = getenv(PodNameEnv); c.Identity == "" {
			c.Identity, _ = os.Hostname()
		}
	}
	str(&c.RootSecret, cluster.RootSecret)
	str(&c.IntermediateSigner, cluster.IntermediateSigner)
	str(&c.JWTKeySigner, cluster.JWTKeySigner)
	str(&c.SVIDSigner, cluster.SVIDSigner)
	dur(&c.RootTTL, DefaultControllerRootTTL)
	dur(&c.RootActivationDelay, DefaultControllerActivationDelay)
	dur(&c.MaxIntermediateTTL, DefaultControllerMaxIntermediateTTL)
	dur(&c.DefaultIntermediateTTL, DefaultClusterIntermediateTTL)
	dur(&c.LeaseDuration, DefaultControllerLeaseDuration)
	dur(&c.RenewDeadline, DefaultControllerRenewDeadline)
	dur(&c.RetryPeriod, DefaultControllerRetryPeriod)
	dur(&c.PodCertificates.MaxTTL, DefaultControllerPodCertificateMaxTTL)
	if len(c.AgentServiceAccounts) == 0 {
		c.AgentServiceAccounts = []string{DefaultControllerAgentServiceAccount}
	}
	if c.PodCertificates.Enabled == nil {
		on := true
		c.PodCertificates.Enabled = &on
	}
	return c
}

// validate checks the section with its defaults filled in.
func (c Controller) validate() error {
	c = c.WithDefaults(func(string) string { return "" })
	if errs := validation.IsDNS1123Label(c.Namespace); len(errs) > 0 {
		return fmt.Errorf("controller.namespace: %q is not a namespace name: %s", c.Namespace, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(c.RootSecret); len(errs) > 0 {
		return fmt.Errorf("controller.rootSecret: %q is not a Secret name: %s", c.RootSecret, strings.Join(errs, "; "))
	}
	for i, sa := range c.AgentServiceAccounts {
		ns, name, ok := strings.Cut(sa, ":")
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
			return fmt.Errorf("controller.agentServiceAccounts[%d]: %q is not namespace:name", i, sa)
		}
	}
	signers := []struct{ field, v string }{
		{"controller.intermediateSigner", c.IntermediateSigner},
		{"controller.jwtKeySigner", c.JWTKeySigner},
		{"controller.svidSigner", c.SVIDSigner},
	}
	for i, s := range signers {
		if err := checkSignerName(s.v); err != nil {
			return fmt.Errorf("%s: %w", s.field, err)
		}
		for _, o := range signers[:i] {
			if o.v == s.v {
				return fmt.Errorf("%s: must differ from %s", s.field, o.field)
			}
		}
	}
	d := func(v Duration) time.Duration { return time.Duration(v) }
	for _, m := range []struct {
		field string
		v     Duration
		min   time.Duration
	}{
		{"controller.rootTTL", c.RootTTL, time.Hour},
		{"controller.rootActivationDelay", c.RootActivationDelay, time.Second},
		{"controller.maxIntermediateTTL", c.MaxIntermediateTTL, MinClusterIntermediateTTL},
		{"controller.defaultIntermediateTTL", c.DefaultIntermediateTTL, MinClusterIntermediateTTL},
		{"controller.leaseDuration", c.LeaseDuration, time.Second},
		{"controller.renewDeadline", c.RenewDeadline, time.Second},
		{"controller.retryPeriod", c.RetryPeriod, 100 * time.Millisecond},
		{"controller.podCertificates.maxTTL", c.PodCertificates.MaxTTL, podcert.MinLifetime},
	} {
		if d(m.v) < m.min {
			return fmt.Errorf("%s: must be at least %s, got %s", m.field, m.min, d(m.v))
		}
	}
	switch {
	case c.DefaultIntermediateTTL > c.MaxIntermediateTTL:
		return fmt.Errorf("controller.defaultIntermediateTTL: %s exceeds maxIntermediateTTL %s", d(c.DefaultIntermediateTTL), d(c.MaxIntermediateTTL))
	case d(c.RootActivationDelay)+c.retainPrevious() > d(c.RootTTL)/3:
		// A root is replaced at 2/3 of its life; the rest must cover the
		// next root's delay and the life of what the old one signed.
		return fmt.Errorf("controller.rootTTL: %s is too short: a third of it must cover rootActivationDelay %s plus the longest certificate it signs, %s (maxIntermediateTTL, podCertificates.maxTTL)",
			d(c.RootTTL), d(c.RootActivationDelay), c.retainPrevious())
	case c.RenewDeadline >= c.LeaseDuration:
		return fmt.Errorf("controller.renewDeadline: %s must be shorter than leaseDuration %s", d(c.RenewDeadline), d(c.LeaseDuration))
	case d(c.RetryPeriod)*12/10 >= d(c.RenewDeadline):
		return fmt.Errorf("controller.retryPeriod: %s must be under renewDeadline %s by the 1.2 jitter factor", d(c.RetryPeriod), d(c.RenewDeadline))
	}
	if f := c.PodCertificates.RefreshFraction; f < 0 || f >= 1 {
		return fmt.Errorf("controller.podCertificates.refreshFraction: must be in (0, 1) (0: one half), got %v", f)
	}
	o := c.OIDC
	if o.Addr != "" {
		if _, port, err := net.SplitHostPort(o.Addr); err != nil || port == "" {
			return fmt.Errorf("controller.oidc.addr: must be host:port, got %q", o.Addr)
		}
		u, err := url.Parse(o.Issuer)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("controller.oidc.issuer: required with addr: an https:// (or, for tests, http://) URL without query or fragment, got %q", o.Issuer)
		}
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return errors.New("controller.oidc.certFile: certFile and keyFile go together")
	}
	return nil
}

// ControllerFromArgs builds the configuration of `csi-agent controller`:
// defaults, the --config file, --kubeconfig, then the controller defaults
// from the environment. The result is validated.
func ControllerFromArgs(args []string, getenv func(string) string, usage io.Writer, extra ...func(*flag.FlagSet)) (Config, error) {
	fs := flag.NewFlagSet("controller", flag.ContinueOnError)
	fs.SetOutput(usage)
	for _, add := range extra {
		add(fs)
	}
	configPath := fs.String("config", "", "YAML config file (trustDomain, metrics, logging and the controller section)")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig file; empty: controller.kubeconfig, else in-cluster")
	// A flag, so a Kustomize component can turn it on without editing the
	// config file the agents share.
	bundleEndpoint := fs.String("bundle-endpoint-address", "", "host:port to serve the trust domain's bundle endpoint on (https_spiffe); overrides controller.bundleEndpoint.address")
	cfg, err := parseAndLoad(fs, args, configPath)
	if err != nil {
		return cfg, err
	}
	if *kubeconfig != "" {
		cfg.Controller.Kubeconfig = *kubeconfig
	}
	if *bundleEndpoint != "" {
		cfg.Controller.BundleEndpoint.Address = *bundleEndpoint
	}
	cfg.Controller = cfg.Controller.WithDefaults(getenv)
	if err := cfg.ValidateController(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// ValidateController checks every field `csi-agent controller` reads: the
// trust domain, logging, metrics and the controller section. The agents'
// sections of a shared file are the agents' to check (Validate).
func (c *Config) ValidateController() error {
	if err := c.validateCommon(); err != nil {
		return err
	}
	if err := c.Controller.validate(); err != nil {
		return err
	}
	td, err := c.TrustDomainID()
	if err != nil {
		return err
	}
	if err := c.Controller.BundleEndpoint.validate(td); err != nil {
		return fmt.Errorf("controller.%w", err) // the messages start with the field
	}
	if c.Controller.Identity == "" {
		return fmt.Errorf("controller.identity: required: set it, or $%s, or give the host a name", PodNameEnv)
	}
	return nil
}

// ControllerOptions configure the controller's leader work.
func (c *Config) ControllerOptions(td spiffeid.TrustDomain) controller.Options {
	cc := c.Controller
	return controller.Options{
		TrustDomain:            td,
		Namespace:              cc.Namespace,
		RootSecret:             cc.RootSecret,
		JWKSConfigMap:          cluster.JWKSConfigMap,
		IntermediateSigner:     cc.IntermediateSigner,
		JWTKeySigner:           cc.JWTKeySigner,
		SVIDSigner:             cc.SVIDSigner,
		AgentServiceAccounts:   cc.AgentServiceAccounts,
		RootTTL:                time.Duration(cc.RootTTL),
		RootActivationDelay:    time.Duration(cc.RootActivationDelay),
		MaxIntermediateTTL:     time.Duration(cc.MaxIntermediateTTL),
		DefaultIntermediateTTL: time.Duration(cc.DefaultIntermediateTTL),
		RetainPrevious:         cc.retainPrevious(),
		RootPoll:               DefaultControllerRootPoll,
		Workers:                DefaultControllerWorkers,
	}
}

// ControllerTrustOptions configure the controller's watch of the published
// trust (controller.bundleEndpoint): the agents' informers, no node.
func (c *Config) ControllerTrustOptions(td spiffeid.TrustDomain) clusterca.Options {
	cc := c.Controller
	return clusterca.Options{
		TrustDomain:        td,
		Namespace:          cc.Namespace,
		IntermediateSigner: cc.IntermediateSigner,
		JWTKeySigner:       cc.JWTKeySigner,
		BundleSigner:       cc.SVIDSigner,
	}
}

// ControllerEndpointSVIDOptions configure the controller bundle endpoint's
// X.509-SVID (https_spiffe).
func (c *Config) ControllerEndpointSVIDOptions(td spiffeid.TrustDomain) controller.EndpointSVIDOptions {
	return controller.EndpointSVIDOptions{
		TrustDomain: td,
		Namespace:   c.Controller.Namespace,
		RootSecret:  c.Controller.RootSecret,
		TTL:         DefaultControllerBundleEndpointSVIDTTL,
	}
}

// LeaderOptions configure the controller's leader election.
func (c *Config) LeaderOptions() leader.Options {
	cc := c.Controller
	return leader.Options{
		Namespace:     cc.Namespace,
		Lease:         cluster.Lease,
		Identity:      cc.Identity,
		LeaseDuration: time.Duration(cc.LeaseDuration),
		RenewDeadline: time.Duration(cc.RenewDeadline),
		RetryPeriod:   time.Duration(cc.RetryPeriod),
	}
}

// PodCertOptions configure PodCertificateRequest signing with signer (the
// controller's root holder) and the svids rules.
func (c *Config) PodCertOptions(td spiffeid.TrustDomain, set *rules.Set, signer podcert.Signer) podcert.Options {
	return podcert.Options{
		SignerName:      c.Controller.SVIDSigner,
		TrustDomain:     td,
		Rules:           set,
		Signer:          signer,
		MaxTTL:          time.Duration(c.Controller.PodCertificates.MaxTTL),
		RefreshFraction: c.Controller.PodCertificates.RefreshFraction,
	}
}

// retainPrevious is the longest life of a certificate the root signs.
func (c Controller) retainPrevious() time.Duration {
	r := time.Duration(c.MaxIntermediateTTL)
	if c.PodCertificatesEnabled() {
		r = max(r, time.Duration(c.PodCertificates.MaxTTL))
	}
	return r
}

// PodCertificatesEnabled reports whether PodCertificateRequests are signed.
func (c Controller) PodCertificatesEnabled() bool {
	return c.PodCertificates.Enabled == nil || *c.PodCertificates.Enabled
}
