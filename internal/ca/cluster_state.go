package ca

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/fsutil"
)

// In cluster mode each key lives with its certificate in one file (PKCS#8
// PRIVATE KEY, then CERTIFICATE), mode 0600: the key never leaves the node,
// and a restart without the API server serves on what the file holds.
// Unlike the self-managed root, a file that does not parse is no reason to
// refuse to start: what it held is replaced by asking the cluster again.

func mkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ca: create state directory %s: %w", dir, err)
	}
	return nil
}

// loadKeyPair reads a key and its certificate; nil when there is no file.
func loadKeyPair(path string, now time.Time) (*signingCA, error) {
	data, err := readPrivateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	p, err := parseKeyPair(data)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", path, err)
	}
	if !now.Before(p.cert.NotAfter) {
		return nil, fmt.Errorf("ca: %s: certificate expired at %s", path, rfc3339(p.cert.NotAfter))
	}
	return p, nil
}

// parseKeyPair decodes exactly a P-256 PKCS#8 key and a certificate for it.
func parseKeyPair(data []byte) (*signingCA, error) {
	var (
		key  *ecdsa.PrivateKey
		cert *x509.Certificate
	)
	blocks, err := decodePEM(data)
	if err != nil {
		return nil, err
	}
	for i, b := range blocks {
		n := i + 1
		switch {
		case b.Type == "PRIVATE KEY" && key == nil && cert == nil:
			k, err := parseP256PKCS8(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: %w", n, err)
			}
			key = k
		case b.Type == "CERTIFICATE" && key != nil && cert == nil:
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: parse certificate: %w", n, err)
			}
			cert = c
		default:
			return nil, fmt.Errorf("PEM block %d: unexpected %q (want one PRIVATE KEY, then one CERTIFICATE)", n, b.Type)
		}
	}
	if key == nil || cert == nil {
		return nil, errors.New("want one PRIVATE KEY, then one CERTIFICATE")
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("private key does not match the certificate")
	}
	return &signingCA{cert: cert, key: key}, nil
}

func writeKeyPair(path string, key *ecdsa.PrivateKey, cert *x509.Certificate) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("ca: encode key for %s: %w", path, err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	if err := fsutil.WriteFileAtomic(path, data, 0o600); err != nil {
		return fmt.Errorf("ca: write %s: %w", path, err)
	}
	return nil
}

// jwksBlock is the PEM type of the JWKS (cluster.MarshalJWKS) in TrustFile.
const jwksBlock = "CSI-AGENT JWKS"

// maxTrustFile bounds TrustFile: a ClusterTrustBundle and a ConfigMap hold
// at most 1 MiB each.
const maxTrustFile = 4 << 20

func writeTrust(path string, t Trust) error {
	var data []byte
	for _, r := range t.Roots {
		data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	jwks, err := cluster.MarshalJWKS(t.JWTKeys)
	if err != nil {
		return fmt.Errorf("ca: encode JWKS: %w", err)
	}
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: jwksBlock, Bytes: jwks})...)
	if err := fsutil.WriteFileAtomic(path, data, 0o600); err != nil {
		return fmt.Errorf("ca: write %s: %w", path, err)
	}
	return nil
}

// loadTrust reads TrustFile; nil when there is none.
func loadTrust(path string) (*Trust, error) {
	data, err := fsutil.ReadFileLimited(path, maxTrustFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ca: read %s: %w", path, err)
	}
	t, err := parseTrust(data)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", path, err)
	}
	return t, nil
}

// parseTrust decodes CERTIFICATE blocks, then exactly one JWKS block.
func parseTrust(data []byte) (*Trust, error) {
	var (
		t    Trust
		jwks bool
	)
	blocks, err := decodePEM(data)
	if err != nil {
		return nil, err
	}
	for i, b := range blocks {
		n := i + 1
		switch {
		case b.Type == "CERTIFICATE" && !jwks:
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: %w", n, err)
			}
			t.Roots = append(t.Roots, c)
		case b.Type == jwksBlock && !jwks:
			keys, err := cluster.ParseJWKS(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: %w", n, err)
			}
			t.JWTKeys, jwks = keys, true
		default:
			return nil, fmt.Errorf("PEM block %d: unexpected %q", n, b.Type)
		}
	}
	if !jwks {
		return nil, errors.New("no JWKS block (truncated?)")
	}
	return &t, nil
}
