// Package agent wires the agent together: CA, identity cache, attestors,
// rules, Workload API server and CSI node plugin, and runs them until the
// context ends.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/attestor/k8s"
	unixattestor "github.com/csi-agent/csi-agent/attestor/unix"
	"github.com/csi-agent/csi-agent/csi"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/svidcache"
	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/workloadapi"
)

// Options are what Run needs beyond the configuration.
type Options struct {
	Version string
	// Reload re-reads the configuration on SIGHUP; nil disables reloads.
	Reload func() (config.Config, error)
	// Started, if set, is called once the Workload API serves.
	Started func()
}

// CompileRules turns the configured svids into a rule set; with none, every
// attested pod gets its namespace/service-account identity.
func CompileRules(td spiffeid.TrustDomain, cfg config.Config) (*rules.Set, error) {
	if len(cfg.SVIDs) == 0 {
		return rules.Default(td), nil
	}
	return rules.Compile(td, cfg.SVIDs)
}

// Run runs the agent until ctx ends or a component fails.
func Run(ctx context.Context, cfg config.Config, opts Options) error {
	// Catch SIGHUP from the start: its default action would kill an agent
	// that is still starting.
	var hup chan os.Signal
	if opts.Reload != nil {
		hup = make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return fmt.Errorf("trustDomain: %w", err)
	}
	if cfg.KubernetesEnabled() && cfg.CSI.Socket == "" && cfg.Kubernetes.CrossCheck == "enforce" {
		return errors.New("kubernetes.crossCheck: enforce needs the CSI plugin (csi.socket) for mount records; set warn or off")
	}
	ruleSet, err := CompileRules(td, cfg)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	fed, err := federation.New(cfg.Federation, federation.Options{OwnTrustDomain: td})
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	auth, err := ca.New(ctx, ca.Options{
		TrustDomain:      td,
		StateDir:         filepath.Join(cfg.StateDir, "ca"),
		UpstreamCertFile: cfg.CA.UpstreamCertFile,
		UpstreamKeyFile:  cfg.CA.UpstreamKeyFile,
		X509SVIDTTL:      time.Duration(cfg.CA.X509SVIDTTL),
		JWTSVIDTTL:       time.Duration(cfg.CA.JWTSVIDTTL),
	})
	if err != nil {
		return fmt.Errorf("start CA: %w", err)
	}
	cache := svidcache.New(auth, svidcache.Options{})

	var recs *records.Store
	if cfg.CSI.Socket != "" || cfg.KubernetesEnabled() {
		if recs, err = records.Open(filepath.Join(cfg.StateDir, "records")); err != nil {
			return fmt.Errorf("open mount records: %w", err)
		}
	}
	att := &chain{unix: unixattestor.New(unixattestor.Options{
		ProcRoot:       cfg.ProcRoot,
		WorkloadPath:   cfg.Unix.WorkloadPath,
		WorkloadSHA256: cfg.Unix.WorkloadSHA256,
		MaxBinarySize:  cfg.Unix.MaxBinarySize,
		PasswdFile:     cfg.Unix.PasswdFile,
		GroupFile:      cfg.Unix.GroupFile,
	})}
	if cfg.KubernetesEnabled() {
		k := cfg.Kubernetes.Kubelet
		if k.TokenFile == config.DefaultTokenFile && (k.ReadOnlyPort > 0 || k.Anonymous || k.ClientCertFile != "") {
			// The default token only applies when nothing else was chosen.
			k.TokenFile = ""
		}
		kc, err := k8s.NewKubeletClient(k8s.KubeletConfig{
			NodeName: cfg.NodeName, Host: k.Host, Port: k.Port, ReadOnlyPort: k.ReadOnlyPort,
			TokenFile: k.TokenFile, CAFile: k.CAFile, ClientCertFile: k.ClientCertFile, ClientKeyFile: k.ClientKeyFile,
			InsecureSkipVerify: k.InsecureSkipVerify, Anonymous: k.Anonymous,
		})
		if err != nil {
			return fmt.Errorf("kubernetes.kubelet: %w", err)
		}
		if att.k8s, err = k8s.New(k8s.Options{
			ProcRoot:    cfg.ProcRoot,
			Pods:        kc,
			Records:     recs,
			CrossCheck:  k8s.CrossCheck(cfg.Kubernetes.CrossCheck),
			NodeName:    cfg.NodeName,
			RetryBudget: time.Duration(cfg.Kubernetes.RetryBudget),
		}); err != nil {
			return fmt.Errorf("kubernetes: %w", err)
		}
	}

	att.rules.Store(ruleSet)

	wl, err := workloadapi.New(workloadapi.Options{
		TrustDomain: td, Attestor: att, Rules: ruleSet, Authority: auth, Cache: cache, Federation: fed,
	})
	if err != nil {
		return err
	}
	lis, err := workloadapi.Listen(cfg.WorkloadAPI.SocketDir, cfg.WorkloadAPI.SocketName)
	if err != nil {
		return fmt.Errorf("workload API socket: %w", err)
	}
	gs, health := workloadapi.NewGRPCServer(wl)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return auth.Run(ctx) })
	g.Go(func() error { return cache.Run(ctx) })
	g.Go(func() error { return fed.Run(ctx) })
	g.Go(func() error {
		if err := gs.Serve(lis); err != nil {
			return fmt.Errorf("workload API: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		wl.SetReady(false)
		health.Shutdown()
		stopped := make(chan struct{})
		go func() { gs.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			gs.Stop()
		}
		return nil
	})

	if cfg.CSI.Socket != "" {
		driver, err := csi.New(csi.Options{
			DriverName:           cfg.CSI.DriverName,
			Version:              opts.Version,
			NodeID:               cfg.NodeName,
			KubeletRootDir:       cfg.CSI.KubeletRootDir,
			WorkloadAPISocketDir: cfg.WorkloadAPI.SocketDir,
			Records:              recs,
			Ready:                wl.Ready,
		})
		if err != nil {
			cancel()
			_ = g.Wait()
			return fmt.Errorf("csi: %w", err)
		}
		if err := driver.Reconcile(ctx); err != nil {
			cancel()
			_ = g.Wait()
			return fmt.Errorf("csi: reconcile mounts with records: %w", err)
		}
		g.Go(func() error { return driver.Serve(ctx, cfg.CSI.Socket) })
		if cfg.RegistrationEnabled() {
			g.Go(func() error {
				return csi.ServeRegistration(ctx, csi.RegistrationOptions{
					RegistryDir: filepath.Join(cfg.CSI.KubeletRootDir, "plugins_registry"),
					DriverName:  cfg.CSI.DriverName,
					Endpoint:    cfg.CSI.Socket,
				})
			})
		}
	}

	if opts.Reload != nil {
		g.Go(func() error { return reloadOnHUP(ctx, hup, td, wl, cache, att, opts.Reload) })
	}

	wl.SetReady(true)
	health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	klog.InfoS("Agent started", "version", opts.Version, "trustDomain", td.String(),
		"workloadAPISocket", cfg.WorkloadAPI.SocketPath(), "csiSocket", cfg.CSI.Socket,
		"kubernetes", cfg.KubernetesEnabled(), "crossCheck", cfg.Kubernetes.CrossCheck)
	if opts.Started != nil {
		opts.Started()
	}
	err = g.Wait()
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// reloadOnHUP swaps the rules (svids) on SIGHUP; other settings need a
// restart. A config that fails to load keeps the running rules: a typo must
// not revoke every identity on the node.
func reloadOnHUP(ctx context.Context, hup <-chan os.Signal, td spiffeid.TrustDomain, wl *workloadapi.Server, cache *svidcache.Cache, att *chain, reload func() (config.Config, error)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hup:
		}
		cfg, err := reload()
		if err != nil {
			klog.ErrorS(err, "Config reload failed; keeping the running rules")
			continue
		}
		set, err := CompileRules(td, cfg)
		if err != nil {
			klog.ErrorS(err, "Config reload failed; keeping the running rules")
			continue
		}
		att.rules.Store(set)
		wl.SetRules(set)
		cache.Notify()
		klog.InfoS("Rules reloaded; other settings take effect on restart", "svids", len(cfg.SVIDs))
	}
}

// chain attests with procfs and, for callers in a pod, with the kubelet.
type chain struct {
	unix  *unixattestor.Attestor
	k8s   *k8s.Attestor
	rules atomic.Pointer[rules.Set] // the running rules, to decide on waiting
}

func (c *chain) Attest(ctx context.Context, pid int32) (attestor.Attributes, error) {
	attrs, err := c.unix.Attest(ctx, pid)
	if err != nil {
		return nil, err
	}
	if c.k8s == nil {
		return attrs, nil
	}
	// Answer from the pod's facts at once; wait for the kubelet to list a
	// new container only when that could change which identities match.
	// Most pods never wait: their first SVID comes as their process starts.
	kattrs, err := c.k8s.AttestWithContainerWait(ctx, pid, 0)
	if err != nil {
		return nil, err
	}
	if kattrs != nil && len(kattrs[k8s.FieldContainerID]) == 0 {
		probe := attestor.Attributes{}
		probe.Merge(attrs)
		probe.Merge(kattrs)
		if c.rules.Load().Pending(probe, k8s.IsContainerField) {
			if kattrs, err = c.k8s.AttestWithContainerWait(ctx, pid, k8s.DefaultContainerWait); err != nil {
				return nil, err
			}
		}
	}
	attrs.Merge(kattrs)
	return attrs, nil
}
