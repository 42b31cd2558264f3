package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"

	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	restclient "k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/controller"
	"github.com/csi-agent/csi-agent/internal/controller/leader"
	"github.com/csi-agent/csi-agent/internal/controller/oidc"
	"github.com/csi-agent/csi-agent/internal/metrics"
	"github.com/csi-agent/csi-agent/internal/podcert"
)

// runController is `csi-agent controller`.
func runController(ctx context.Context, args []string, stderr io.Writer) error {
	var klogFlags *flag.FlagSet
	addKlog := func(fs *flag.FlagSet) { klog.InitFlags(fs); klogFlags = fs }
	cfg, err := config.ControllerFromArgs(args, os.Getenv, stderr, addKlog)
	if err != nil {
		return err
	}
	if err := applyLogging(cfg.Logging.Format, klogFlags); err != nil {
		return err
	}
	defer klog.Flush()
	return runControllerConfig(ctx, cfg, controllerOptions{version: version})
}

// controllerOptions are what runControllerConfig needs beyond the config.
type controllerOptions struct {
	version string
	// listening, if set, is told the bound addresses (port 0 in tests).
	metricsListening, oidcListening, bundleListening func(net.Addr)
}

// runControllerConfig wires the controller: every replica serves OIDC
// discovery and health; the leader signs and writes. SIGTERM (ctx) stops
// the leader's work, then releases the Lease.
func runControllerConfig(ctx context.Context, cfg config.Config, opts controllerOptions) error {
	td, err := cfg.TrustDomainID()
	if err != nil {
		return fmt.Errorf("trustDomain: %w", err)
	}
	// Empty kubeconfig: in-cluster (the pod's service account).
	rest, err := clientcmd.BuildConfigFromFlags("", cfg.Controller.Kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	rest.UserAgent = "csi-agent-controller/" + opts.version
	rest.QPS, rest.Burst = config.DefaultControllerQPS, config.DefaultControllerBurst
	client, err := kubernetes.NewForConfig(rest)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}

	m := metrics.NewController(opts.version)
	var metricsLn, oidcLn net.Listener
	if cfg.Metrics.Addr != "" {
		if metricsLn, err = metrics.Listen(cfg.Metrics.Addr); err != nil {
			return err
		}
		defer metricsLn.Close()
		if opts.metricsListening != nil {
			opts.metricsListening(metricsLn.Addr())
		}
	}
	if a := cfg.Controller.OIDC.Addr; a != "" {
		if oidcLn, err = net.Listen("tcp", a); err != nil {
			return fmt.Errorf("oidc listener: %w", err)
		}
		defer oidcLn.Close()
		if opts.oidcListening != nil {
			opts.oidcListening(oidcLn.Addr())
		}
	}

	ctrlOpts := cfg.ControllerOptions(td)
	ctrlOpts.Metrics = m
	ctrl, err := controller.New(client, ctrlOpts)
	if err != nil {
		return err
	}
	m.WatchRootExpiry(ctrl.Holder().Expiry)
	keys, err := controller.NewKeyWatcher(client, cfg.Controller.Namespace, cluster.JWKSConfigMap)
	if err != nil {
		return err
	}
	var oidcHandler http.Handler
	if oidcLn != nil {
		o := cfg.Controller.OIDC
		if oidcHandler, err = oidc.NewHandler(oidc.Options{Issuer: o.Issuer, Keys: keys.Keys}); err != nil {
			return err
		}
		if o.CertFile != "" {
			if oidcLn, err = oidc.TLSListener(oidcLn, o.CertFile, o.KeyFile); err != nil {
				return err
			}
		}
	}
	serveBundle, bundleLn, bundleReady, err := controllerBundleEndpoint(cfg, td, client, ctrl.Holder())
	if err != nil {
		return err
	}
	if bundleLn != nil {
		defer bundleLn.Close()
		if opts.bundleListening != nil {
			opts.bundleListening(bundleLn.Addr())
		}
	}
	tasks := []leader.Task{ctrl.Run}
	if cfg.Controller.PodCertificatesEnabled() {
		set, err := cfg.Rules(td)
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		pcRest := restclient.CopyConfig(rest)
		pcRest.QPS, pcRest.Burst = config.DefaultPodCertQPS, config.DefaultPodCertBurst
		pcClient, err := kubernetes.NewForConfig(pcRest)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		pc, err := podcert.New(pcClient, cfg.PodCertOptions(td, set, ctrl.Holder()))
		if err != nil {
			return err
		}
		tasks = append(tasks, func(ctx context.Context) error {
			// Signs with the root the controller loads first.
			if err := ctrl.Holder().Wait(ctx); err != nil {
				return nil
			}
			return pc.Run(ctx)
		})
	}
	lopts := cfg.LeaderOptions()
	lopts.OnLeader = m.Leader

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return keys.Run(ctx) })
	g.Go(func() error { return leader.Run(ctx, client, lopts, tasks...) })
	if metricsLn != nil {
		checks := []metrics.Check{{Name: "jwks", Ready: func() error {
			if !keys.Synced() {
				return errors.New("the JWKS ConfigMap has not been read yet")
			}
			return nil
		}}}
		if bundleReady != nil {
			// A Service routes the bundle endpoint to ready replicas only.
			checks = append(checks, metrics.Check{Name: "bundle", Ready: func() error {
				if !bundleReady() {
					return errors.New("the ClusterTrustBundle and the JWKS ConfigMap have not been read yet")
				}
				return nil
			}})
		}
		h := m.Handler(checks...)
		g.Go(func() error { return metrics.Serve(ctx, metricsLn, h) })
	}
	if serveBundle != nil {
		g.Go(func() error { return serveBundle(ctx) })
	}
	if oidcLn != nil {
		// The metrics listener's server: the same timeouts suit.
		g.Go(func() error { return metrics.Serve(ctx, oidcLn, oidcHandler) })
	}
	klog.InfoS("Controller started", "version", opts.version, "trust_domain", td.String(), "namespace", cfg.Controller.Namespace,
		"identity", cfg.Controller.Identity, "metrics_addr", cfg.Metrics.Addr, "oidc_addr", cfg.Controller.OIDC.Addr,
		"bundle_endpoint_addr", cfg.Controller.BundleEndpoint.Address)
	err = g.Wait()
	if err != nil && !errors.Is(err, context.Canceled) {
		klog.ErrorS(err, "Controller stopped")
		return err
	}
	klog.InfoS("Controller stopped")
	return nil
}
