package main

import (
	"context"
	"errors"
	"fmt"
	"net"
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

	"github.com/csi-agent/csi-agent/attestor/k8s"
	unixattestor "github.com/csi-agent/csi-agent/attestor/unix"
	"github.com/csi-agent/csi-agent/csi"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/clusterca"
	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/fsutil"
	"github.com/csi-agent/csi-agent/internal/metrics"
	"github.com/csi-agent/csi-agent/internal/peer"
	"github.com/csi-agent/csi-agent/internal/records"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/socketalias"
	"github.com/csi-agent/csi-agent/internal/svidcache"
	"github.com/csi-agent/csi-agent/internal/unixsock"
	"github.com/csi-agent/csi-agent/workloadapi"
)

const (
	// stopTimeout bounds a graceful stop: open streams never end by themselves.
	stopTimeout = 5 * time.Second
	// socketPoll is how often the Workload API socket file is checked.
	socketPoll = time.Second
)

// agentOptions are what runAgentConfig needs beyond the configuration.
type agentOptions struct {
	version string
	// reload re-reads the configuration on SIGHUP; nil disables reloads.
	reload func() (config.Config, error)
	// started, if set, is called once the Workload API serves.
	started func()
	// metricsListening, if set, is told the metrics listener's address: a
	// port 0 in the configuration is known only once it is bound.
	metricsListening func(net.Addr)
}

// runAgentConfig constructs every component from cfg, then runs them until
// ctx ends or one fails. It only wires: policy lives in the components and
// defaults in internal/config.
func runAgentConfig(ctx context.Context, cfg config.Config, opts agentOptions) error {
	// Catch SIGHUP from the start: its default action would kill an agent
	// that is still starting.
	var hup chan os.Signal
	if opts.reload != nil {
		hup = make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
	}
	td, err := cfg.TrustDomainID()
	if err != nil {
		return fmt.Errorf("trustDomain: %w", err)
	}
	ruleSet, err := cfg.Rules(td)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	// Before anything is created there: two agents on one state dir would
	// otherwise each make a CA, and the survivor could serve a root that is
	// not the one on disk.
	stateLock, err := fsutil.Lock(cfg.StateDir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	defer stateLock.Close()
	m := metrics.New(opts.version)
	// After the lock: bundle endpoints' last good bundles are kept in the state dir.
	fedOpts := cfg.FederationOptions(td)
	fedOpts.Observe = m.FederationFetches()
	fed, err := federation.New(cfg.Federation, fedOpts)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	m.WatchFederation(fed.Failing)
	var metricsLn net.Listener
	if cfg.Metrics.Addr != "" {
		// Opened first: a taken address stops the start.
		if metricsLn, err = metrics.Listen(cfg.Metrics.Addr); err != nil {
			return err
		}
		defer metricsLn.Close()
		if opts.metricsListening != nil {
			opts.metricsListening(metricsLn.Addr())
		}
	}
	caOpts := cfg.CAOptions(td)
	var clusterCA *clusterca.Client // cluster mode's API server client
	if caOpts.Cluster != nil {
		if clusterCA, err = newClusterCA(cfg, td); err != nil {
			return err
		}
		caOpts.Cluster.Signer, caOpts.Cluster.Trust = clusterCA, clusterCA
	}
	auth, err := ca.New(ctx, caOpts)
	if err != nil {
		return fmt.Errorf("start CA: %w", err)
	}
	m.WatchExpiry(auth.Expiry)
	cache := svidcache.New(auth, svidcache.Options{Minted: m.Minted})
	serveBundle, closeBundle, err := listenBundleEndpoint(cfg, td, auth, cache)
	if err != nil {
		return err
	}
	if closeBundle != nil {
		defer closeBundle()
	}

	var recs *records.Store
	if cfg.CSI.Socket != "" || cfg.KubernetesEnabled() {
		if recs, err = records.Open(cfg.RecordsDir()); err != nil {
			return fmt.Errorf("open mount records: %w", err)
		}
		defer recs.Close()
		m.WatchRecords(func() int { return len(recs.All()) })
	}
	unix, err := unixattestor.New(cfg.UnixOptions())
	if err != nil {
		return fmt.Errorf("unix: %w", err)
	}
	wlOpts := workloadapi.Options{
		TrustDomain: td, Unix: unix, Rules: ruleSet, Bundle: auth, SVIDs: cache, Federation: fed,
		MaxAudiences: cfg.WorkloadAPI.Limits.MaxAudiences, MaxAudienceBytes: cfg.WorkloadAPI.Limits.MaxAudienceBytes,
		Metrics: m,
	}
	if cfg.KubernetesEnabled() {
		kcfg := cfg.KubeletConfig()
		kcfg.Observe = m.KubeletRequest
		kc, err := k8s.NewKubeletClient(kcfg)
		if err != nil {
			return fmt.Errorf("kubernetes.kubelet: %w", err)
		}
		defer kc.Close()
		var mounts k8s.Records // stays nil, not a nil *Store, without records
		if recs != nil {
			mounts = recs
		}
		if wlOpts.Pods, err = k8s.New(cfg.KubernetesOptions(kc, mounts)); err != nil {
			return fmt.Errorf("kubernetes: %w", err)
		}
	}
	wl, err := workloadapi.New(wlOpts)
	if err != nil {
		return err
	}
	// Made here so that a socket another agent serves stops the start.
	listen := func() (*net.UnixListener, error) {
		return workloadapi.Listen(cfg.WorkloadAPI.SocketDir, cfg.WorkloadAPI.SocketName)
	}
	lis, err := listen()
	if err != nil {
		return fmt.Errorf("workload API socket: %w", err)
	}
	pending := lis // ServeKept's first listener
	// socketUp is false while the socket file is missing: pods would get a
	// mount with nothing in it, so the CSI plugin is not ready meanwhile.
	var socketUp atomic.Bool
	socketUp.Store(true)
	gs, health := workloadapi.NewGRPCServer(wl, grpcLimits(cfg.WorkloadAPI.Limits))
	health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING) // until the CA is ready

	var (
		driver     *csi.Driver
		registered atomic.Bool // the kubelet registered the CSI driver
	)
	if cfg.CSI.Socket != "" {
		if driver, err = csi.New(csi.Options{
			DriverName:           cfg.CSI.DriverName,
			Version:              opts.version,
			NodeID:               cfg.NodeName,
			KubeletRootDir:       cfg.CSI.KubeletRootDir,
			WorkloadAPISocketDir: cfg.WorkloadAPI.SocketDir,
			Records:              recs,
			Ready:                func() bool { return wl.Ready() && socketUp.Load() },
			Observe:              m.CSIOperation,
		}); err != nil {
			lis.Close()
			return fmt.Errorf("csi: %w", err)
		}
	}

	// SPIRE's other names of the socket; made last, so no early return
	// leaves them behind.
	aliases, err := socketalias.New(socketalias.Options{Dir: cfg.WorkloadAPI.SocketDir, Target: cfg.WorkloadAPI.SocketName,
		Names: cfg.WorkloadAPI.SocketAliases, Poll: socketPoll})
	if err != nil {
		lis.Close()
		return fmt.Errorf("workload API socket: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return auth.Run(ctx) })
	if clusterCA != nil {
		g.Go(func() error { return clusterCA.Run(ctx) })
	}
	g.Go(func() error { return cache.Run(ctx) })
	g.Go(func() error { return fed.Run(ctx) })
	if serveBundle != nil {
		g.Go(func() error { return serveBundle(ctx) })
	}
	g.Go(func() error { return aliases.Run(ctx) })
	g.Go(func() error {
		// Stop answering before the server stops, so probes see it first.
		serving, stop := context.WithCancel(context.Background())
		go func() {
			<-ctx.Done()
			wl.SetReady(false)
			health.Shutdown()
			stop()
		}()
		err := unixsock.ServeKept(serving, gs, unixsock.KeptOptions{
			Path: cfg.WorkloadAPI.SocketPath(),
			Listen: func() (*net.UnixListener, error) {
				if l := pending; l != nil {
					pending = nil
					return l, nil
				}
				return listen()
			},
			Poll:        socketPoll,
			StopTimeout: stopTimeout,
			Up: func(up bool) {
				socketUp.Store(up)
				switch {
				case !up:
					health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
				case wl.Ready():
					health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
				}
			},
		})
		if err != nil {
			return fmt.Errorf("workload API: %w", err)
		}
		return nil
	})

	if driver != nil {
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
					Registered:  registered.Store,
				})
			})
		}
	}
	if metricsLn != nil {
		h := m.Handler(readiness(wl.Ready, socketUp.Load, auth.Ready, registered.Load, driver != nil && cfg.RegistrationEnabled())...)
		g.Go(func() error { return metrics.Serve(ctx, metricsLn, h) })
	}
	if opts.reload != nil {
		g.Go(func() error { return reloadOnHUP(ctx, hup, td, len(cfg.SVIDs) > 0, wl.SetRules, opts.reload) })
	}

	if err := auth.Ready(); err != nil {
		// Cluster mode: not ready before the cluster certified this node.
		klog.InfoS("Waiting for the CA to be ready", "reason", err.Error(), "ca_mode", cfg.CAMode())
		if auth.WaitReady(ctx) != nil {
			if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		}
	}
	wl.SetReady(true)
	health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	klog.InfoS("Agent started", "version", opts.version, "trust_domain", td.String(),
		"socket", cfg.WorkloadAPI.SocketPath(), "csi_socket", cfg.CSI.Socket,
		"kubernetes", cfg.KubernetesEnabled(), "cross_check", cfg.Kubernetes.CrossCheck, "metrics_addr", cfg.Metrics.Addr)
	if opts.started != nil {
		opts.started()
	}
	err = g.Wait()
	if err != nil && !errors.Is(err, context.Canceled) {
		klog.ErrorS(err, "Agent stopped")
		return err
	}
	klog.InfoS("Agent stopped")
	return nil
}

// readiness lists what /readyz checks: the Workload API serves on its
// socket, the CA and the intermediate are valid and, with registration
// on, the kubelet registered the CSI driver.
func readiness(serving, socketUp func() bool, caReady func() error, registered func() bool, withCSI bool) []metrics.Check {
	checks := []metrics.Check{
		{Name: "workload-api", Ready: func() error {
			switch {
			case !serving():
				return errors.New("not serving")
			case !socketUp():
				return errors.New("socket file missing")
			}
			return nil
		}},
		{Name: "ca", Ready: caReady},
	}
	if withCSI {
		checks = append(checks, metrics.Check{Name: "csi-registration", Ready: func() error {
			if !registered() {
				return errors.New("the kubelet has not registered the CSI driver")
			}
			return nil
		}})
	}
	return checks
}

// fdReserve is kept out of the Workload API's connections: the CSI socket,
// the kubelet, state files and procfs reads need descriptors too.
const fdReserve = 512

// grpcLimits turns the configured limits into the server's, with the
// connections bounded by the descriptors the process may open as well.
// (The Go runtime raises the soft RLIMIT_NOFILE to the hard limit at start.)
func grpcLimits(l config.Limits) workloadapi.Limits {
	total, unattested := l.MaxConnections, l.MaxUnattestedConnections
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < uint64(total+fdReserve) {
		fit := max(int(rl.Cur)-fdReserve, 16)
		klog.InfoS("Open-file limit caps the Workload API's connections", "max_open_files", rl.Cur, "max_connections", fit)
		total, unattested = fit, min(unattested, fit/2)
	}
	return workloadapi.Limits{
		Connections: peer.Limits{Total: total, Unproven: unattested, PerCaller: l.MaxConnectionsPerCaller},
		Callers: workloadapi.CallerLimits{
			Streams: l.MaxStreamsPerCaller, TotalStreams: l.MaxStreams,
			DeniedPerSecond: float64(l.DeniedCallsPerSecond), DeniedBurst: l.DeniedCallBurst,
		},
		StreamsPerConnection: uint32(l.MaxStreamsPerConnection),
		MaxRequestBytes:      l.MaxRequestBytes,
		HandshakeTimeout:     time.Duration(l.HandshakeTimeout),
		IdleTimeout:          time.Duration(l.IdleTimeout),
	}
}

// reloadSettle gathers a burst of SIGHUPs (a config being written, a
// script signalling in a loop) into one reload.
const reloadSettle = 200 * time.Millisecond

// reloadOnHUP swaps the rules (svids) on SIGHUP; other settings need a
// restart. A config that fails to load keeps the running rules: a typo must
// not revoke every identity on the node. Nor may a reload widen access: a
// config that lost its svids would fall back to the default rules, so it is
// refused while svids are running.
func reloadOnHUP(ctx context.Context, hup <-chan os.Signal, td spiffeid.TrustDomain, configured bool, setRules func(*rules.Set), reload func() (config.Config, error)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hup:
		}
		settle := time.NewTimer(reloadSettle)
	gather:
		for {
			select {
			case <-ctx.Done():
				settle.Stop()
				return nil
			case <-hup:
			case <-settle.C:
				break gather
			}
		}
		cfg, err := reload()
		if err != nil {
			klog.ErrorS(err, "Config reload failed; keeping the running rules")
			continue
		}
		if configured && len(cfg.SVIDs) == 0 {
			klog.ErrorS(nil, "Config reload has no svids; keeping the running rules (restart to use the default rules)")
			continue
		}
		set, err := cfg.Rules(td)
		if err != nil {
			klog.ErrorS(err, "Config reload failed; keeping the running rules")
			continue
		}
		setRules(set)
		configured = len(cfg.SVIDs) > 0
		klog.InfoS("Rules reloaded; other settings take effect on restart", "svids", len(cfg.SVIDs))
	}
}
