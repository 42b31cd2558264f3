// Package issue makes the certificates the controller signs: node
// intermediates, JWT-key receipts and workload X.509-SVIDs. Each function
// is pure given its clock and its parent; none keeps state.
package issue

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/x509util"
)

// Parent is a CA that signs: its certificate and private key.
type Parent struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// subjectOrg keeps subjects non-empty for TLS stacks that want one; the
// identity is in the URI SAN.
const subjectOrg = "SPIFFE"

// Intermediate issues a node intermediate CA for id in td: it may sign
// leaves only (path length 0), only for IDs of td (name constraint).
func Intermediate(p Parent, pub crypto.PublicKey, td spiffeid.TrustDomain, id spiffeid.ID, now time.Time, ttl time.Duration) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{subjectOrg}, CommonName: "csi-agent node intermediate"},
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		PermittedURIDomains:   []string{td.Name()},
	}
	return sign(p, tmpl, pub, now, ttl)
}

// Receipt issues the certificate that answers a JWT-key CSR: not a CA and
// good for nothing but showing that id's key was registered until NotAfter.
func Receipt(p Parent, pub crypto.PublicKey, id spiffeid.ID, now time.Time, ttl time.Duration) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{subjectOrg}, CommonName: "csi-agent node JWT key"},
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	return sign(p, tmpl, pub, now, ttl)
}

// SVID issues a workload X.509-SVID for id with the DNS SANs given.
func SVID(p Parent, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, now time.Time, ttl time.Duration) (*x509.Certificate, error) {
	if id.IsZero() || id.Path() == "" {
		return nil, fmt.Errorf("issue: %q is not a workload ID", id)
	}
	usage := x509.KeyUsageDigitalSignature
	switch pub.(type) {
	case *rsa.PublicKey:
		usage |= x509.KeyUsageKeyEncipherment
	case *ecdsa.PublicKey, ed25519.PublicKey:
	default:
		return nil, fmt.Errorf("issue: unsupported public key type %T", pub)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{subjectOrg}},
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	return sign(p, tmpl, pub, now, ttl)
}

// sign fills in the serial and the validity, [now, now+ttl] clamped to the
// parent's, and signs.
func sign(p Parent, tmpl *x509.Certificate, pub crypto.PublicKey, now time.Time, ttl time.Duration) (*x509.Certificate, error) {
	if p.Cert == nil || p.Key == nil {
		return nil, errors.New("issue: no signing CA")
	}
	notBefore, notAfter, err := x509util.Validity(now, 0, ttl, p.Cert)
	if err != nil {
		return nil, err
	}
	serial, err := x509util.Serial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter = serial, notBefore, notAfter
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.Cert, pub, p.Key)
	if err != nil {
		return nil, fmt.Errorf("issue: sign: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue: parse what was signed: %w", err)
	}
	return cert, nil
}

// Root makes a self-signed root CA for td, valid for ttl from now: it signs
// node intermediates (path length 1) and pod certificates.
func Root(td spiffeid.TrustDomain, now time.Time, ttl time.Duration) (Parent, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Parent{}, fmt.Errorf("issue: generate root key: %w", err)
	}
	serial, err := x509util.Serial()
	if err != nil {
		return Parent{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{subjectOrg}, CommonName: "csi-agent root " + td.Name(), SerialNumber: serial.Text(16)},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Truncate(time.Second),
		NotAfter:              now.Add(ttl).Truncate(time.Second),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return Parent{}, fmt.Errorf("issue: sign root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Parent{}, fmt.Errorf("issue: parse root: %w", err)
	}
	return Parent{Cert: cert, Key: key}, nil
}
