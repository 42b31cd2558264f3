package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/fsutil"
)

// StateFile is the name of the self-managed CA file inside Options.StateDir.
//
// All CA material lives in this one file so that every update (first start,
// root rotation) is a single atomic rename: a crash can never leave a key
// without its certificate. Layout, in order:
//
//	PRIVATE KEY  (PKCS#8, header "Role: x509-root") key of the active root
//	CERTIFICATE  the active root, matching that key
//	CERTIFICATE  ... previous roots, kept in the bundle until they expire
//	PRIVATE KEY  (PKCS#8, header "Role: jwt-svid") the JWT-SVID signing key
const StateFile = "ca.pem"

const (
	roleHeader = "Role"
	roleRoot   = "x509-root"
	roleJWT    = "jwt-svid"
)

type state struct {
	path     string
	root     *signingCA
	oldRoots []*x509.Certificate
	jwtKey   *ecdsa.PrivateKey
}

// openState loads the CA state from dir, creating it on first start. A file
// that exists but does not parse or does not fit together is an error, never
// a reason to start over: a new root would silently change the trust anchor
// under running workloads.
func openState(dir string, td spiffeid.TrustDomain, now time.Time) (*state, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ca: create state directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, StateFile)
	data, err := readPrivateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return createState(path, td, now)
	}
	if err != nil {
		return nil, err
	}
	st, err := parseState(data, td, now)
	if err != nil {
		return nil, fmt.Errorf("ca: state file %s: %w (refusing to start; restore the file, or remove it to create a new trust anchor)", path, err)
	}
	st.path = path
	klog.InfoS("Loaded self-managed CA", "path", path, "trust_domain", td,
		"root_serial", st.root.cert.SerialNumber.Text(16), "root_expires", st.root.cert.NotAfter, "previous_roots", len(st.oldRoots))
	return st, nil
}

// readPrivateFile reads a file that holds private keys and refuses it when
// others can read or write it.
func readPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("ca: open state file %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("ca: stat state file %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("ca: state file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("ca: state file %s holds private keys but has mode %04o; it must not be accessible by group or others (chmod 0600)", path, perm)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("ca: read state file %s: %w", path, err)
	}
	return data, nil
}

func createState(path string, td spiffeid.TrustDomain, now time.Time) (*state, error) {
	root, err := newRoot(td, now)
	if err != nil {
		return nil, err
	}
	jwtKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate JWT-SVID key: %w", err)
	}
	st := &state{path: path, root: root, jwtKey: jwtKey}
	if err := st.write(); err != nil {
		return nil, err
	}
	klog.InfoS("Created self-managed CA", "path", path, "trust_domain", td,
		"root_serial", root.cert.SerialNumber.Text(16), "root_expires", root.cert.NotAfter)
	return st, nil
}

func (st *state) write() error {
	data, err := marshalState(st.root, st.oldRoots, st.jwtKey)
	if err != nil {
		return fmt.Errorf("ca: encode state file %s: %w", st.path, err)
	}
	if err := fsutil.WriteFileAtomic(st.path, data, 0o600); err != nil {
		return fmt.Errorf("ca: write state file: %w", err)
	}
	return nil
}

func marshalState(root *signingCA, oldRoots []*x509.Certificate, jwtKey *ecdsa.PrivateKey) ([]byte, error) {
	rootKey, err := x509.MarshalPKCS8PrivateKey(root.key)
	if err != nil {
		return nil, err
	}
	jwtDER, err := x509.MarshalPKCS8PrivateKey(jwtKey)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	blocks := []*pem.Block{
		{Type: "PRIVATE KEY", Headers: map[string]string{roleHeader: roleRoot}, Bytes: rootKey},
		{Type: "CERTIFICATE", Bytes: root.cert.Raw},
	}
	for _, c := range oldRoots {
		blocks = append(blocks, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	blocks = append(blocks, &pem.Block{Type: "PRIVATE KEY", Headers: map[string]string{roleHeader: roleJWT}, Bytes: jwtDER})
	for _, b := range blocks {
		if err := pem.Encode(&buf, b); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// parseState decodes and cross-checks the state file. Expired previous roots
// are dropped; an expired active root is returned and rotated by the caller.
func parseState(data []byte, td spiffeid.TrustDomain, now time.Time) (*state, error) {
	var (
		certs           []*x509.Certificate
		rootKey, jwtKey *ecdsa.PrivateKey
	)
	blocks, err := decodePEM(data)
	if err != nil {
		return nil, err
	}
	for i, b := range blocks {
		n := i + 1
		switch b.Type {
		case "CERTIFICATE":
			if len(b.Headers) != 0 {
				return nil, fmt.Errorf("PEM block %d: unexpected headers on a certificate", n)
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: parse certificate: %w", n, err)
			}
			certs = append(certs, c)
		case "PRIVATE KEY":
			k, err := parseP256PKCS8(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("PEM block %d: %w", n, err)
			}
			role := b.Headers[roleHeader]
			if len(b.Headers) != 1 {
				role = ""
			}
			switch {
			case role == roleRoot && rootKey == nil && len(certs) == 0:
				rootKey = k
			case role == roleJWT && jwtKey == nil:
				jwtKey = k
			default:
				return nil, fmt.Errorf("PEM block %d: unexpected private key (role %q)", n, role)
			}
		default:
			return nil, fmt.Errorf("PEM block %d: unexpected type %q", n, b.Type)
		}
	}
	switch {
	case rootKey == nil:
		return nil, errors.New("no root private key (Role: x509-root)")
	case len(certs) == 0:
		return nil, errors.New("no root certificate")
	case jwtKey == nil:
		return nil, errors.New("no JWT-SVID private key (Role: jwt-svid)")
	}

	root := certs[0]
	if !rootKey.PublicKey.Equal(root.PublicKey) {
		return nil, errors.New("root private key does not match the root certificate")
	}
	st := &state{root: &signingCA{cert: root, key: rootKey}, jwtKey: jwtKey}
	for i, c := range certs {
		if err := checkCACert(c, td); err != nil {
			return nil, fmt.Errorf("certificate %d: %w", i+1, err)
		}
		if err := c.CheckSignatureFrom(c); err != nil {
			return nil, fmt.Errorf("certificate %d is not a valid self-signed root: %w", i+1, err)
		}
		if i > 0 && now.Before(c.NotAfter) {
			st.oldRoots = append(st.oldRoots, c)
		}
	}
	return st, nil
}

// decodePEM returns every PEM block of data. pem.Decode skips text before
// a block; in our own files stray bytes mean corruption.
func decodePEM(data []byte) ([]*pem.Block, error) {
	var blocks []*pem.Block
	rest := data
	for {
		rest = bytes.TrimLeft(rest, " \t\r\n")
		if len(rest) == 0 {
			return blocks, nil
		}
		if !bytes.HasPrefix(rest, []byte("-----BEGIN ")) {
			return nil, fmt.Errorf("unexpected data after PEM block %d (truncated or corrupted)", len(blocks))
		}
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, fmt.Errorf("PEM block %d is malformed (truncated or corrupted)", len(blocks)+1)
		}
		blocks = append(blocks, b)
	}
}

func parseP256PKCS8(der []byte) (*ecdsa.PrivateKey, error) {
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("private key is %T, want ECDSA P-256", k)
	}
	return ek, nil
}

// checkCACert requires a CA that may sign certificates and, if it carries a
// SPIFFE ID, carries exactly the trust domain's ID.
func checkCACert(c *x509.Certificate, td spiffeid.TrustDomain) error {
	if !c.BasicConstraintsValid || !c.IsCA {
		return errors.New("not a CA certificate (basic constraints cA=false)")
	}
	if c.KeyUsage != 0 && c.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("CA certificate lacks the keyCertSign key usage")
	}
	if c.MaxPathLenZero && c.MaxPathLen == 0 {
		return errors.New("CA certificate has path length 0 and cannot sign an intermediate")
	}
	for _, u := range c.URIs {
		if u.Scheme != "spiffe" {
			continue
		}
		id, err := spiffeid.FromURI(u)
		if err != nil {
			return fmt.Errorf("CA certificate has an invalid SPIFFE ID %q: %w", u, err)
		}
		if id.TrustDomain() != td {
			return fmt.Errorf("CA certificate belongs to trust domain %q, not the configured %q", id.TrustDomain(), td)
		}
		if id.Path() != "" {
			return fmt.Errorf("CA certificate SPIFFE ID %q must not have a path", id)
		}
	}
	return nil
}

// rotateRootLocked replaces the self-managed root. The new file is written
// before memory changes so a failed write leaves everything as it was.
func (a *Authority) rotateRootLocked(now time.Time) error {
	nr, err := newRoot(a.td, now)
	if err != nil {
		return err
	}
	var old []retiredRoot
	var oldCerts []*x509.Certificate
	for _, r := range append([]retiredRoot{{cert: a.root.cert, until: a.root.cert.NotAfter}}, a.oldRoot...) {
		if now.Before(r.until) {
			old = append(old, r)
			oldCerts = append(oldCerts, r.cert)
		}
	}
	st := &state{path: a.statePath, root: nr, oldRoots: oldCerts, jwtKey: a.jwtKey}
	if err := st.write(); err != nil {
		return err
	}
	klog.InfoS("Rotated self-managed root", "path", a.statePath, "trust_domain", a.td,
		"old_serial", a.root.cert.SerialNumber.Text(16), "new_serial", nr.cert.SerialNumber.Text(16), "new_expires", nr.cert.NotAfter)
	a.root, a.oldRoot = nr, old
	a.interRotateAt = time.Time{} // re-issue the intermediate from the new root
	return nil
}
