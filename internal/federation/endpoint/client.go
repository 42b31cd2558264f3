package endpoint

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// DefaultMaxBundleSize bounds a bundle document when ClientOptions leaves
// it unset: a bundle of dozens of authorities is tens of kilobytes.
const DefaultMaxBundleSize = 1 << 20

// DefaultTimeout bounds one fetch when ClientOptions leaves it unset.
const DefaultTimeout = 30 * time.Second

// Reasons a fetch fails, as FetchError.Reason: a small fixed set, fit for a
// metric label.
const (
	ReasonUnreachable    = "unreachable"     // no connection, or no answer in time
	ReasonServerIdentity = "server_identity" // the server is not who it must be
	ReasonHTTPStatus     = "http_status"     // an answer other than 200
	ReasonTooLarge       = "too_large"       // a document over the size limit
)

// FetchError is a failed fetch, with the reason it failed.
type FetchError struct {
	Reason string
	Err    error
}

func (e *FetchError) Error() string { return e.Err.Error() }
func (e *FetchError) Unwrap() error { return e.Err }

// ClientOptions configure a Client.
type ClientOptions struct {
	URL     string // https://...
	Profile string // ProfileHTTPSWeb or ProfileHTTPSSPIFFE
	// SPIFFEID and Bundle (https_spiffe): the endpoint's SPIFFE ID, and the
	// source of its trust domain's bundle that authenticates it, read at
	// each connection (the last good bundle, so that a rotated CA is
	// followed).
	SPIFFEID spiffeid.ID
	Bundle   x509bundle.Source
	// Roots (https_web) verify the server's Web PKI certificate; nil: the
	// system's roots.
	Roots *x509.CertPool
	// MaxSize defaults to DefaultMaxBundleSize; Timeout to DefaultTimeout.
	MaxSize int64
	Timeout time.Duration
}

// Client fetches the bundle document of one bundle endpoint.
type Client struct {
	url     string
	http    *http.Client
	maxSize int64
}

// NewClient checks opts.
func NewClient(opts ClientOptions) (*Client, error) {
	u, err := url.Parse(opts.URL)
	if err != nil {
		return nil, fmt.Errorf("url: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("url: %q: want https://host[:port]/path", opts.URL)
	}
	var tc *tls.Config
	switch opts.Profile {
	case ProfileHTTPSSPIFFE:
		if opts.SPIFFEID.IsZero() || opts.Bundle == nil {
			return nil, errors.New("https_spiffe needs the endpoint's SPIFFE ID and a bundle to authenticate it")
		}
		tc = tlsconfig.TLSClientConfig(opts.Bundle, tlsconfig.AuthorizeID(opts.SPIFFEID))
		verify := tc.VerifyPeerCertificate
		tc.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
			if err := verify(raw, chains); err != nil {
				return &FetchError{Reason: ReasonServerIdentity, Err: err}
			}
			return nil
		}
	case ProfileHTTPSWeb:
		tc = &tls.Config{RootCAs: opts.Roots, MinVersion: tls.VersionTLS12}
	default:
		return nil, fmt.Errorf("profile: unknown profile %q (want %s or %s)", opts.Profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	c := &Client{url: u.String(), maxSize: opts.MaxSize}
	if c.maxSize <= 0 {
		c.maxSize = DefaultMaxBundleSize
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	tr := &http.Transport{
		// Bundle endpoints are reached directly, never through a proxy
		// from the environment: the identity check is end to end anyway,
		// but a proxy would see which trust domains we federate with.
		Proxy:                 nil,
		TLSClientConfig:       tc,
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
		// Fetches come minutes apart: each authenticates the server afresh.
		DisableKeepAlives: true,
		ForceAttemptHTTP2: true,
	}
	c.http = &http.Client{
		Transport: tr,
		Timeout:   timeout,
		// A redirect would take the request to a server the profile did
		// not name; the spec has the endpoint answer itself.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c, nil
}

// Fetch GETs the bundle document. Errors are *FetchError.
func (c *Client) Fetch(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url, http.NoBody)
	if err != nil {
		return nil, &FetchError{Reason: ReasonUnreachable, Err: err}
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		var fe *FetchError
		var ve *tls.CertificateVerificationError
		switch {
		case errors.As(err, &fe):
			return nil, &FetchError{Reason: fe.Reason, Err: err}
		case errors.As(err, &ve):
			return nil, &FetchError{Reason: ReasonServerIdentity, Err: err}
		}
		return nil, &FetchError{Reason: ReasonUnreachable, Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, &FetchError{Reason: ReasonHTTPStatus, Err: fmt.Errorf("GET %s: %s", c.url, resp.Status)}
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, c.maxSize+1))
	if err != nil {
		return nil, &FetchError{Reason: ReasonUnreachable, Err: fmt.Errorf("GET %s: read: %w", c.url, err)}
	}
	if int64(len(data)) > c.maxSize {
		return nil, &FetchError{Reason: ReasonTooLarge, Err: fmt.Errorf("GET %s: bundle larger than %d bytes", c.url, c.maxSize)}
	}
	return data, nil
}
