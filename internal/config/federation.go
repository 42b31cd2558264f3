package config

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
)

// DefaultBundleEndpointID is the path of our bundle endpoint's SPIFFE ID
// (https_spiffe) when bundleEndpoint.spiffeID is unset.
const DefaultBundleEndpointID = "/csi-agent/bundle-endpoint"

// DefaultBundleEndpointMaxConnections bounds the connections a bundle
// endpoint serves at once; each answer closes its connection, so a slot is
// held for one fetch (at most the handshake and header timeouts).
const DefaultBundleEndpointMaxConnections = 64

// BundleEndpoint serves our trust domain's bundle to the trust domains that
// federate with us (SPIFFE Federation); off while Address is empty. In
// cluster mode the controller serves it instead, one per trust domain.
type BundleEndpoint struct {
	// Address is host:port to listen on, e.g. 0.0.0.0:8443.
	Address string `json:"address"`
	// Profile is https_spiffe (the default: our own X.509-SVID) or
	// https_web (CertFile and KeyFile, e.g. from cert-manager).
	Profile string `json:"profile"`
	// SPIFFEID (https_spiffe) is the endpoint's SPIFFE ID, "/path" or a
	// full ID of our trust domain; default DefaultBundleEndpointID.
	SPIFFEID string `json:"spiffeID"`
	CertFile string `json:"certFile"`
	KeyFile  string `json:"keyFile"`
	// RefreshHint is the spiffe_refresh_hint served; default 5m.
	RefreshHint Duration `json:"refreshHint"`
}

// FederationRefresh bounds how often the bundle endpoints of federation
// sources are fetched, whatever their refresh hint says; defaults 30s and 1h.
type FederationRefresh struct {
	Min Duration `json:"min"`
	Max Duration `json:"max"`
}

// minFederationRefresh keeps a misconfigured peer's hint of 0 from turning
// into a fetch loop.
const minFederationRefresh = time.Second

func (b BundleEndpoint) validate(td spiffeid.TrustDomain) error {
	if b.Address == "" {
		if b.Profile != "" || b.SPIFFEID != "" || b.CertFile != "" || b.KeyFile != "" {
			return errors.New("bundleEndpoint.address: required to serve the bundle endpoint")
		}
		return nil
	}
	if _, port, err := net.SplitHostPort(b.Address); err != nil || port == "" {
		return fmt.Errorf("bundleEndpoint.address: must be host:port (such as 0.0.0.0:8443), got %q", b.Address)
	}
	switch b.profile() {
	case endpoint.ProfileHTTPSSPIFFE:
		if b.CertFile != "" || b.KeyFile != "" {
			return errors.New("bundleEndpoint.certFile: only for profile https_web; https_spiffe serves our own X.509-SVID")
		}
		if _, err := b.endpointID(td); err != nil {
			return fmt.Errorf("bundleEndpoint.spiffeID: %w", err)
		}
	case endpoint.ProfileHTTPSWeb:
		if b.CertFile == "" || b.KeyFile == "" {
			return errors.New("bundleEndpoint.certFile: profile https_web needs certFile and keyFile")
		}
		if b.SPIFFEID != "" {
			return errors.New("bundleEndpoint.spiffeID: only for profile https_spiffe")
		}
	default:
		return fmt.Errorf("bundleEndpoint.profile: must be %s or %s, got %q", endpoint.ProfileHTTPSSPIFFE, endpoint.ProfileHTTPSWeb, b.Profile)
	}
	if b.RefreshHint < 0 || b.RefreshHint > 0 && time.Duration(b.RefreshHint) < minFederationRefresh {
		return fmt.Errorf("bundleEndpoint.refreshHint: must be at least %s, got %s", minFederationRefresh, time.Duration(b.RefreshHint))
	}
	return nil
}

func (b BundleEndpoint) profile() string {
	if b.Profile == "" {
		return endpoint.ProfileHTTPSSPIFFE
	}
	return b.Profile
}

func (b BundleEndpoint) endpointID(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	s := b.SPIFFEID
	if s == "" {
		s = DefaultBundleEndpointID
	}
	var (
		id  spiffeid.ID
		err error
	)
	if s[0] == '/' {
		id, err = spiffeid.FromPath(td, s)
	} else {
		id, err = spiffeid.FromString(s)
	}
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%q: %w", s, err)
	}
	if id.TrustDomain() != td {
		return spiffeid.ID{}, fmt.Errorf("%q is not in our trust domain %s", s, td.Name())
	}
	return id, nil
}

func (r FederationRefresh) validate() error {
	for _, d := range []struct {
		field string
		v     Duration
	}{{"federationRefresh.min", r.Min}, {"federationRefresh.max", r.Max}} {
		if d.v < 0 || d.v > 0 && time.Duration(d.v) < minFederationRefresh {
			return fmt.Errorf("%s: must be at least %s, got %s", d.field, minFederationRefresh, time.Duration(d.v))
		}
	}
	if r.Min > 0 && r.Max > 0 && r.Max < r.Min {
		return fmt.Errorf("federationRefresh.max: %s is below min %s", time.Duration(r.Max), time.Duration(r.Min))
	}
	return nil
}

// validateFederation checks the bundle endpoint and the refresh bounds;
// the sources themselves are checked by federation.New, which names them.
func (c *Config) validateFederation() error {
	td, err := c.TrustDomainID()
	if err != nil {
		return err
	}
	if err := c.BundleEndpoint.validate(td); err != nil {
		return err
	}
	return c.FederationRefresh.validate()
}

// FederationOptions are the federation watcher's options; it keeps the
// last good bundle of each bundle endpoint in the state dir.
func (c *Config) FederationOptions(td spiffeid.TrustDomain) federation.Options {
	return federation.Options{
		OwnTrustDomain: td,
		StateDir:       c.StateDir,
		MinRefresh:     time.Duration(c.FederationRefresh.Min),
		MaxRefresh:     time.Duration(c.FederationRefresh.Max),
	}
}

// BundleEndpointOptions are the bundle endpoint server's options but its
// bundle and SVID sources, which the wiring adds; ok is false when the
// endpoint is off.
func (c *Config) BundleEndpointOptions(td spiffeid.TrustDomain) (opts endpoint.ServerOptions, ok bool) {
	return c.BundleEndpoint.options(td)
}

// ControllerBundleEndpointOptions are BundleEndpointOptions for the
// controller's controller.bundleEndpoint.
func (c *Config) ControllerBundleEndpointOptions(td spiffeid.TrustDomain) (opts endpoint.ServerOptions, ok bool) {
	return c.Controller.BundleEndpoint.options(td)
}

func (b BundleEndpoint) options(td spiffeid.TrustDomain) (opts endpoint.ServerOptions, ok bool) {
	if b.Address == "" {
		return endpoint.ServerOptions{}, false
	}
	opts = endpoint.ServerOptions{Profile: b.profile(), RefreshHint: time.Duration(b.RefreshHint), MaxConnections: DefaultBundleEndpointMaxConnections}
	if opts.Profile == endpoint.ProfileHTTPSSPIFFE {
		opts.SPIFFEID, _ = b.endpointID(td) // validated
	} else {
		opts.CertFile, opts.KeyFile = b.CertFile, b.KeyFile
	}
	return opts, true
}
