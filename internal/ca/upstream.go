package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/fsutil"
)

// minRSABits is the smallest upstream RSA key we sign with.
const minRSABits = 2048

// maxUpstreamFileSize bounds an upstream file: a Secret holds at most 1 MiB.
const maxUpstreamFileSize = 1 << 20

// upstreamFiles are the upstream CA files (for example a Kubernetes Secret
// mounted as files), read through their paths each time so that kubelet's
// symlink swap of the Secret directory is seen like any other change.
type upstreamFiles struct {
	certFile, keyFile string

	// Touched only by New and then Run's goroutine.
	sum     [sha256.Size]byte // of the content last parsed, valid or not
	lastErr string            // last read error reported, so each is reported once
}

// read returns the content of both files. The certificate is read again
// after the key: if it changed meanwhile, the Secret is being swapped under
// us and the pair may not belong together, so stable reports false.
func (u *upstreamFiles) read() (certPEM, keyPEM []byte, stable bool, err error) {
	certPEM, err = fsutil.ReadFileLimited(u.certFile, maxUpstreamFileSize)
	if err != nil {
		return nil, nil, false, fmt.Errorf("ca: read upstream certificate: %w", err)
	}
	keyPEM, err = fsutil.ReadFileLimited(u.keyFile, maxUpstreamFileSize)
	if err != nil {
		return nil, nil, false, fmt.Errorf("ca: read upstream key: %w", err)
	}
	again, err := fsutil.ReadFileLimited(u.certFile, maxUpstreamFileSize)
	if err != nil {
		return nil, nil, false, fmt.Errorf("ca: read upstream certificate: %w", err)
	}
	return certPEM, keyPEM, bytes.Equal(certPEM, again), nil
}

// contentSum identifies a pair of file contents.
func contentSum(certPEM, keyPEM []byte) [sha256.Size]byte {
	h := sha256.New()
	for _, b := range [][]byte{certPEM, keyPEM} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// parse checks an upstream CA certificate and key. The first
// certificate in certPEM is the one matching the key; it becomes the trust
// anchor of the bundle.
func (u *upstreamFiles) parse(certPEM, keyPEM []byte, td spiffeid.TrustDomain, now time.Time) (*signingCA, error) {
	certFile, keyFile := u.certFile, u.keyFile
	certs, err := ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream certificate %s: %w", certFile, err)
	}
	key, err := parsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: upstream key %s: %w", keyFile, err)
	}
	cert := certs[0]
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("ca: upstream key %s does not match the first certificate in %s", keyFile, certFile)
	}
	if err := checkCACert(cert, td); err != nil {
		return nil, fmt.Errorf("ca: upstream certificate %s: %w", certFile, err)
	}
	switch {
	case now.Before(cert.NotBefore):
		return nil, fmt.Errorf("ca: upstream certificate %s is not valid before %s", certFile, cert.NotBefore.UTC().Format(time.RFC3339))
	case !now.Before(cert.NotAfter):
		return nil, fmt.Errorf("ca: upstream certificate %s expired at %s", certFile, cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if len(certs) > 1 {
		klog.InfoS("Upstream certificate file holds more than one certificate; only the first is used as the trust anchor",
			"path", certFile, "count", len(certs))
	}
	return &signingCA{cert: cert, key: key}, nil
}

// load reads and checks the files for New, reading again while a swap of
// the Secret is seen in progress.
func (u *upstreamFiles) load(td spiffeid.TrustDomain, now time.Time) (*signingCA, error) {
	var certPEM, keyPEM []byte
	for range 3 {
		var (
			stable bool
			err    error
		)
		certPEM, keyPEM, stable, err = u.read()
		if err != nil {
			return nil, err
		}
		if stable {
			break
		}
	}
	u.sum = contentSum(certPEM, keyPEM)
	return u.parse(certPEM, keyPEM, td, now)
}

// ParseCertificatesPEM parses PEM certificates and nothing else (a CA file,
// a ClusterTrustBundle).
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for n := 1; ; n++ {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d has type %q, want CERTIFICATE", n, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate found")
	}
	return certs, nil
}

// parsePrivateKeyPEM parses exactly one unencrypted RSA or ECDSA private key
// in PKCS#1, SEC1 or PKCS#8 form. "EC PARAMETERS" blocks are skipped.
func parsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	var key crypto.Signer
	for n := 1; ; n++ {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type == "EC PARAMETERS" {
			continue
		}
		if b.Type == "ENCRYPTED PRIVATE KEY" || strings.Contains(b.Headers["Proc-Type"], "ENCRYPTED") {
			return nil, fmt.Errorf("PEM block %d: encrypted private keys are not supported", n)
		}
		var (
			k   any
			err error
		)
		switch b.Type {
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(b.Bytes)
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		default:
			return nil, fmt.Errorf("PEM block %d has type %q, want a private key", n, b.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: parse %s: %w", n, strings.ToLower(b.Type), err)
		}
		if key != nil {
			return nil, errors.New("more than one private key")
		}
		switch k := k.(type) {
		case *rsa.PrivateKey:
			if k.N.BitLen() < minRSABits {
				return nil, fmt.Errorf("RSA key of %d bits is too small (minimum %d)", k.N.BitLen(), minRSABits)
			}
			key = k
		case *ecdsa.PrivateKey:
			key = k
		default:
			return nil, fmt.Errorf("unsupported private key type %T (want RSA or ECDSA)", k)
		}
	}
	if key == nil {
		return nil, errors.New("no private key found")
	}
	return key, nil
}

// jwtKeyInfo separates the JWT key derivation from any other use of the
// upstream key. Bump the version to change the derived key on purpose.
const jwtKeyInfo = "csi-agent jwt-svid signing key v1"

// deriveJWTKey derives the ES256 JWT-SVID signing key from the upstream CA
// key, so every agent holding the same upstream key signs with the same JWT
// key and validates every other agent's JWT-SVIDs, with no coordination.
//
// Trade-off: every node already holds the upstream key, so deriving from it
// exposes nothing new, and HKDF is one-way, so a leaked JWT key does not
// reveal the upstream key. But, as with the shared CA key itself, a
// compromised node can mint JWT-SVIDs for any ID in the trust domain; node
// isolation of the trust domain needs a central issuer, not this mode.
func deriveJWTKey(upstream crypto.Signer, td spiffeid.TrustDomain) (*ecdsa.PrivateKey, error) {
	var secret []byte
	switch k := upstream.(type) {
	case *ecdsa.PrivateKey:
		b, err := k.Bytes()
		if err != nil {
			return nil, err
		}
		secret = b
	case *rsa.PrivateKey:
		secret = k.D.FillBytes(make([]byte, (k.N.BitLen()+7)/8))
	default:
		return nil, fmt.Errorf("unsupported upstream key type %T", upstream)
	}
	// 16 bytes beyond the 32-byte order make the reduction bias negligible
	// (FIPS 186-5 A.2.1, "extra random bits").
	okm, err := hkdf.Key(sha256.New, secret, nil, jwtKeyInfo+"\x00"+td.Name(), 48)
	if err != nil {
		return nil, err
	}
	curve := elliptic.P256()
	nMinus1 := new(big.Int).Sub(curve.Params().N, big.NewInt(1))
	d := new(big.Int).SetBytes(okm)
	d.Mod(d, nMinus1).Add(d, big.NewInt(1))
	return ecdsa.ParseRawPrivateKey(curve, d.FillBytes(make([]byte, 32)))
}
