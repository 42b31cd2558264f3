package config

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
)

func TestFederationConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	tests := []struct {
		name, yaml string
		wantErr    string
		check      func(t *testing.T, c Config)
	}{
		{name: "off by default", yaml: "trustDomain: example.org", check: func(t *testing.T, c Config) {
			if _, ok := c.BundleEndpointOptions(td); ok {
				t.Error("bundle endpoint on by default")
			}
			if o := c.FederationOptions(td); o.StateDir != c.StateDir || o.MinRefresh != 0 || o.MaxRefresh != 0 {
				t.Errorf("federation options %+v", o)
			}
		}},
		{name: "https_spiffe by default", yaml: "bundleEndpoint: {address: '127.0.0.1:8443'}", check: func(t *testing.T, c Config) {
			o, ok := c.BundleEndpointOptions(td)
			if !ok || o.Profile != endpoint.ProfileHTTPSSPIFFE || o.SPIFFEID.String() != "spiffe://example.org"+DefaultBundleEndpointID {
				t.Errorf("options %+v", o)
			}
		}},
		{name: "full ID and hint", yaml: "bundleEndpoint: {address: ':8443', spiffeID: 'spiffe://example.org/be', refreshHint: 1m}\nfederationRefresh: {min: 2s, max: 10m}", check: func(t *testing.T, c Config) {
			o, _ := c.BundleEndpointOptions(td)
			if o.SPIFFEID.String() != "spiffe://example.org/be" || o.RefreshHint != time.Minute {
				t.Errorf("options %+v", o)
			}
			if f := c.FederationOptions(td); f.MinRefresh != 2*time.Second || f.MaxRefresh != 10*time.Minute {
				t.Errorf("federation options %+v", f)
			}
		}},
		{name: "https_web", yaml: "bundleEndpoint: {address: ':8443', profile: https_web, certFile: /c, keyFile: /k}", check: func(t *testing.T, c Config) {
			o, _ := c.BundleEndpointOptions(td)
			if o.Profile != endpoint.ProfileHTTPSWeb || o.CertFile != "/c" || o.KeyFile != "/k" || !o.SPIFFEID.IsZero() {
				t.Errorf("options %+v", o)
			}
		}},
		{name: "settings without address", yaml: "bundleEndpoint: {profile: https_web}", wantErr: "bundleEndpoint.address: required"},
		{name: "bad address", yaml: "bundleEndpoint: {address: '8443'}", wantErr: "bundleEndpoint.address: must be host:port"},
		{name: "unknown profile", yaml: "bundleEndpoint: {address: ':8443', profile: https}", wantErr: `bundleEndpoint.profile: must be https_spiffe or https_web, got "https"`},
		{name: "https_web without files", yaml: "bundleEndpoint: {address: ':8443', profile: https_web, certFile: /c}", wantErr: "bundleEndpoint.certFile: profile https_web needs certFile and keyFile"},
		{name: "https_web with an ID", yaml: "bundleEndpoint: {address: ':8443', profile: https_web, certFile: /c, keyFile: /k, spiffeID: /x}", wantErr: "bundleEndpoint.spiffeID: only for profile https_spiffe"},
		{name: "https_spiffe with files", yaml: "bundleEndpoint: {address: ':8443', certFile: /c, keyFile: /k}", wantErr: "bundleEndpoint.certFile: only for profile https_web"},
		{name: "ID of another trust domain", yaml: "bundleEndpoint: {address: ':8443', spiffeID: 'spiffe://other.org/x'}", wantErr: `bundleEndpoint.spiffeID: "spiffe://other.org/x" is not in our trust domain example.org`},
		{name: "bad ID", yaml: "bundleEndpoint: {address: ':8443', spiffeID: 'be'}", wantErr: `bundleEndpoint.spiffeID: "be"`},
		{name: "tiny hint", yaml: "bundleEndpoint: {address: ':8443', refreshHint: 10ms}", wantErr: "bundleEndpoint.refreshHint: must be at least 1s"},
		{name: "controller https_web", yaml: "controller: {bundleEndpoint: {address: ':8443', profile: https_web, certFile: /c, keyFile: /k}}", check: func(t *testing.T, c Config) {
			o, ok := c.ControllerBundleEndpointOptions(td)
			if !ok || o.Profile != endpoint.ProfileHTTPSWeb || o.CertFile != "/c" || o.KeyFile != "/k" {
				t.Errorf("controller options %+v, %v", o, ok)
			}
			if _, ok := c.BundleEndpointOptions(td); ok {
				t.Error("the agent's bundle endpoint is on")
			}
		}},
		{name: "controller https_spiffe by default", yaml: "controller: {bundleEndpoint: {address: ':8443'}}", check: func(t *testing.T, c Config) {
			o, ok := c.ControllerBundleEndpointOptions(td)
			if !ok || o.Profile != endpoint.ProfileHTTPSSPIFFE || o.SPIFFEID.String() != "spiffe://example.org"+DefaultBundleEndpointID {
				t.Errorf("controller options %+v, %v", o, ok)
			}
		}},
		{name: "controller off by default", yaml: "trustDomain: example.org", check: func(t *testing.T, c Config) {
			if _, ok := c.ControllerBundleEndpointOptions(td); ok {
				t.Error("controller bundle endpoint on by default")
			}
		}},
		{name: "tiny refresh", yaml: "federationRefresh: {min: 1ms}", wantErr: "federationRefresh.min: must be at least 1s"},
		{name: "reversed refresh", yaml: "federationRefresh: {min: 1h, max: 1m}", wantErr: "federationRefresh.max: 1m0s is below min 1h0m0s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte("trustDomain: example.org\n" + strings.TrimPrefix(tt.yaml, "trustDomain: example.org")))
			if err == nil {
				err = c.Validate()
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
}
