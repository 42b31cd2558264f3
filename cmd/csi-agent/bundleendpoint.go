package main

import (
	"context"
	"fmt"
	"net"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/config"
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
	opts.Bundle, opts.SVIDs = bundle, svids
	srv, err := endpoint.NewServer(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("bundleEndpoint: %w", err)
	}
	ln, err := net.Listen("tcp", cfg.BundleEndpoint.Address)
	if err != nil {
		return nil, nil, fmt.Errorf("bundleEndpoint.address: %w", err)
	}
	return func(ctx context.Context) error { return srv.Serve(ctx, ln) }, func() { ln.Close() }, nil
}
