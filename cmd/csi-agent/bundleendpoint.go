package main

import (
	"context"
	"fmt"
	"net"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"

	"github.com/csi-agent/csi-agent/internal/clusterca"
	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/controller"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
)

// listenBundleEndpoint binds the bundle endpoint when it is configured, so
// that a taken port stops the start; serve runs it, release frees the port
// if serve never ran. Both are nil when the endpoint is off.
func listenBundleEndpoint(cfg config.Config, td spiffeid.TrustDomain, bundle endpoint.BundleSource, svids endpoint.SVIDSource) (serve func(context.Context) error, release func(), err error) {
	opts, ok := cfg.BundleEndpointOptions(td)
	if !ok {
		return nil, nil, nil
	}
	serve, ln, err := listenEndpoint("bundleEndpoint", cfg.BundleEndpoint.Address, opts, bundle, svids)
	if err != nil {
		return nil, nil, err
	}
	return serve, func() { ln.Close() }, nil
}

// controllerBundleEndpoint is controller.bundleEndpoint, on every replica:
// the bundle is the published trust (the agents' informers on the
// ClusterTrustBundle and the JWKS ConfigMap); https_spiffe signs its SVID
// with the leader's root, or on a standby with the root Secret's. serve
// also runs the informers; ln is nil when the endpoint is off.
func controllerBundleEndpoint(cfg config.Config, td spiffeid.TrustDomain, client kubernetes.Interface, holder *rootca.Holder) (serve func(context.Context) error, ln net.Listener, ready func() bool, err error) {
	opts, ok := cfg.ControllerBundleEndpointOptions(td)
	if !ok {
		return nil, nil, nil, nil
	}
	trust, err := clusterca.NewTrust(client, cfg.ControllerTrustOptions(td))
	if err != nil {
		return nil, nil, nil, err
	}
	svids := controller.NewEndpointSVIDs(client, holder, cfg.ControllerEndpointSVIDOptions(td))
	serveEndpoint, ln, err := listenEndpoint("controller.bundleEndpoint", cfg.Controller.BundleEndpoint.Address, opts, controller.NewBundle(td, trust), svids)
	if err != nil {
		return nil, nil, nil, err
	}
	serve = func(ctx context.Context) error {
		ctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { _ = trust.Run(ctx) }) // returns nil
		defer wg.Wait()
		defer cancel()
		return serveEndpoint(ctx)
	}
	ready = func() bool { _, ok := trust.Trust(); return ok }
	return serve, ln, ready, nil
}

// listenEndpoint binds addr for a bundle endpoint server of opts; field
// names the config section in errors.
func listenEndpoint(field, addr string, opts endpoint.ServerOptions, bundle endpoint.BundleSource, svids endpoint.SVIDSource) (serve func(context.Context) error, ln net.Listener, err error) {
	opts.Bundle, opts.SVIDs = bundle, svids
	srv, err := endpoint.NewServer(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", field, err)
	}
	if ln, err = net.Listen("tcp", addr); err != nil {
		return nil, nil, fmt.Errorf("%s.address: %w", field, err)
	}
	return func(ctx context.Context) error { return srv.Serve(ctx, ln) }, ln, nil
}
