package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/csi-agent/csi-agent/internal/x509util"
)

// subject of every certificate we issue. A non-empty subject keeps older TLS
// stacks that reject empty subjects happy; the SPIFFE ID is in the URI SAN.
const subjectOrg = "SPIFFE"

// MintX509SVID issues a fresh X.509-SVID for id, with optional DNS SANs.
// Certificates[0] is the leaf, Certificates[1] the signing intermediate.
func (a *Authority) MintX509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (*x509svid.SVID, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := a.checkID(id); err != nil {
		return nil, err
	}
	dnsNames, err := cleanDNSNames(dnsNames)
	if err != nil {
		return nil, err
	}
	now := a.now()
	inter, err := a.currentIntermediate(now)
	if err != nil {
		return nil, err
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate X.509-SVID key: %w", err)
	}
	serial, err := x509util.Serial()
	if err != nil {
		return nil, err
	}
	notBefore, notAfter, err := x509util.Validity(now, backdate, a.x509TTL, inter.cert)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{subjectOrg}},
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, inter.cert, &key.PublicKey, inter.key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign X.509-SVID for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse X.509-SVID for %s: %w", id, err)
	}
	return &x509svid.SVID{
		ID:           id,
		Certificates: []*x509.Certificate{leaf, inter.cert},
		PrivateKey:   key,
	}, nil
}

// checkID admits only workload IDs of our trust domain.
func (a *Authority) checkID(id spiffeid.ID) error {
	switch {
	case id.IsZero():
		return errors.New("ca: empty SPIFFE ID")
	case !id.MemberOf(a.td):
		return fmt.Errorf("ca: SPIFFE ID %q is not in trust domain %q", id, a.td)
	case id.Path() == "":
		return fmt.Errorf("ca: SPIFFE ID %q has no path; only workload IDs are issued", id)
	}
	return nil
}

// newIntermediate issues the in-memory intermediate that signs leaves. It is
// rotated at half of its actual lifetime.
func newIntermediate(td spiffeid.TrustDomain, parent *signingCA, now time.Time, ttl time.Duration) (*signingCA, time.Time, error) {
	if !now.Before(parent.cert.NotAfter) {
		return nil, time.Time{}, fmt.Errorf("ca: issuing CA %q expired at %s", parent.cert.Subject, parent.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: generate intermediate key: %w", err)
	}
	serial, err := x509util.Serial()
	if err != nil {
		return nil, time.Time{}, err
	}
	notBefore, notAfter, err := x509util.Validity(now, backdate, ttl, parent.cert)
	if err != nil {
		return nil, time.Time{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{subjectOrg}, CommonName: "csi-agent intermediate", SerialNumber: serial.Text(16)},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent.cert, &key.PublicKey, parent.key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: sign intermediate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: parse intermediate: %w", err)
	}
	rotateAt := now.Add(cert.NotAfter.Sub(now) / 2)
	return &signingCA{cert: cert, key: key}, rotateAt, nil
}

// newRoot makes a self-signed root for a self-managed trust domain.
func newRoot(td spiffeid.TrustDomain, now time.Time) (*signingCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate root key: %w", err)
	}
	serial, err := x509util.Serial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{subjectOrg}, CommonName: "csi-agent root " + td.Name(), SerialNumber: serial.Text(16)},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-backdate).Truncate(time.Second),
		NotAfter:              now.Add(rootTTL).Truncate(time.Second),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse root: %w", err)
	}
	return &signingCA{cert: cert, key: key}, nil
}

// cleanDNSNames checks DNS SANs (hostnames, optionally a leading "*."
// wildcard label) and drops duplicates, keeping order.
func cleanDNSNames(names []string) ([]string, error) {
	if len(names) == 0 {
		return nil, nil
	}
	out := make([]string, 0, len(names))
	seen := make(map[string]struct{}, len(names))
	for _, n := range names {
		if err := checkDNSName(n); err != nil {
			return nil, err
		}
		n = strings.TrimSuffix(strings.ToLower(n), ".")
		if _, dup := seen[n]; dup {
			continue
		}
		seen[n] = struct{}{}
		out = append(out, n)
	}
	return out, nil
}

func checkDNSName(name string) error {
	if name == "" || len(name) > 253 {
		return fmt.Errorf("ca: invalid DNS name %q: length must be 1..253", name)
	}
	labels := strings.Split(strings.TrimSuffix(name, "."), ".")
	for i, l := range labels {
		if l == "*" && i == 0 && len(labels) > 1 {
			continue
		}
		if l == "" || len(l) > 63 {
			return fmt.Errorf("ca: invalid DNS name %q: bad label length", name)
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("ca: invalid DNS name %q: label starts or ends with '-'", name)
		}
		for j := 0; j < len(l); j++ {
			c := l[j]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("ca: invalid DNS name %q: character %q not allowed", name, c)
			}
		}
	}
	return nil
}
