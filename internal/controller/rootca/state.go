// Package rootca holds the trust domain's root CA as the controller keeps
// it in the root Secret, and decides its rotation: when a next root is made,
// when it starts to sign, and how long the previous one stays trusted.
package rootca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
)

// Secret data keys and annotations.
const (
	KeyCert         = corev1.TLSCertKey       // the root that signs now
	KeyKey          = corev1.TLSPrivateKeyKey // its key
	KeyNextCert     = "next.crt"              // the root that signs from NextActivates
	KeyNextKey      = "next.key"
	KeyPreviousCert = "previous.crt" // roots still trusted until PreviousUntil

	// AnnotationManagedBy with value ManagedBy marks a Secret the controller
	// made and rotates; any other Secret is the user's and is used as is.
	AnnotationManagedBy = "csi-agent.spiffe.io/managed-by"
	ManagedBy           = "csi-agent"
	// AnnotationRotate (any value) asks for a rotation now; the controller
	// removes it.
	AnnotationRotate        = "csi-agent.spiffe.io/rotate"
	AnnotationNextActivates = "csi-agent.spiffe.io/next-activates-at"
	AnnotationPreviousUntil = "csi-agent.spiffe.io/previous-until"
)

// State is the root CA at one moment.
type State struct {
	Current       issue.Parent
	Next          *issue.Parent // published, not signing until NextActivates
	NextActivates time.Time
	Previous      []*x509.Certificate // published until PreviousUntil
	PreviousUntil time.Time
	// Managed: the controller made the Secret and rotates the root.
	Managed bool
	// RotateRequested: the Secret carries AnnotationRotate.
	RotateRequested bool
	// SignsFrom: Current signs only from then on (zero: at once). A user's
	// root that reached the Secret while no replica led is published by
	// the next leader and waits out the activation delay, as a rotated
	// root does. Kept in memory only: the user's Secret is not written.
	SignsFrom time.Time
}

// Bundle is every root to trust: current, next and previous, once each.
func (s State) Bundle() []*x509.Certificate {
	var out []*x509.Certificate
	add := func(c *x509.Certificate) {
		if c == nil {
			return
		}
		for _, o := range out {
			if bytes.Equal(o.Raw, c.Raw) {
				return
			}
		}
		out = append(out, c)
	}
	add(s.Current.Cert)
	if s.Next != nil {
		add(s.Next.Cert)
	}
	for _, c := range s.Previous {
		add(c)
	}
	return out
}

// EncodeCertificates is the PEM of certs, in order.
func EncodeCertificates(certs []*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// Decode reads the state from a root Secret's data and annotations.
func Decode(data map[string][]byte, annotations map[string]string) (State, error) {
	var s State
	cur, err := ParsePair(data[KeyCert], data[KeyKey])
	if err != nil {
		return s, fmt.Errorf("root secret %s/%s: %w", KeyCert, KeyKey, err)
	}
	s.Current = cur
	s.Managed = annotations[AnnotationManagedBy] == ManagedBy
	_, s.RotateRequested = annotations[AnnotationRotate]
	if !s.Managed {
		// The user's Secret holds one root; our bookkeeping is not read
		// from it.
		return s, nil
	}
	if len(data[KeyNextCert]) > 0 || len(data[KeyNextKey]) > 0 {
		next, err := ParsePair(data[KeyNextCert], data[KeyNextKey])
		if err != nil {
			return s, fmt.Errorf("root secret %s/%s: %w", KeyNextCert, KeyNextKey, err)
		}
		if s.NextActivates, err = parseTime(annotations, AnnotationNextActivates); err != nil {
			return s, err
		}
		s.Next = &next
	}
	if p := data[KeyPreviousCert]; len(p) > 0 {
		if s.Previous, err = ca.ParseCertificatesPEM(p); err != nil {
			return s, fmt.Errorf("root secret %s: %w", KeyPreviousCert, err)
		}
		if s.PreviousUntil, err = parseTime(annotations, AnnotationPreviousUntil); err != nil {
			return s, err
		}
	}
	return s, nil
}

func parseTime(annotations map[string]string, key string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339, annotations[key])
	if err != nil {
		return time.Time{}, fmt.Errorf("root secret annotation %s: %w", key, err)
	}
	return t, nil
}

// Encode is the Secret data of a managed state and the annotations it
// sets; annotations mapped to "" are to be removed.
func (s State) Encode() (map[string][]byte, map[string]string, error) {
	data := map[string][]byte{}
	ann := map[string]string{
		AnnotationManagedBy:     ManagedBy,
		AnnotationRotate:        "",
		AnnotationNextActivates: "",
		AnnotationPreviousUntil: "",
	}
	var err error
	if data[KeyCert], data[KeyKey], err = encodePair(s.Current); err != nil {
		return nil, nil, err
	}
	if s.Next != nil {
		if data[KeyNextCert], data[KeyNextKey], err = encodePair(*s.Next); err != nil {
			return nil, nil, err
		}
		ann[AnnotationNextActivates] = s.NextActivates.UTC().Format(time.RFC3339)
	}
	if len(s.Previous) > 0 {
		data[KeyPreviousCert] = EncodeCertificates(s.Previous)
		ann[AnnotationPreviousUntil] = s.PreviousUntil.UTC().Format(time.RFC3339)
	}
	return data, ann, nil
}

func encodePair(p issue.Parent) (certPEM, keyPEM []byte, err error) {
	der, err := x509.MarshalPKCS8PrivateKey(p.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("root secret: encode key: %w", err)
	}
	return EncodeCertificates([]*x509.Certificate{p.Cert}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParsePair parses a CA certificate (the first of certPEM; the rest, a
// chain, is ignored) and its unencrypted RSA or ECDSA key (PKCS#1, SEC1 or
// PKCS#8), checks they belong together and that the certificate may sign
// certificates.
func ParsePair(certPEM, keyPEM []byte) (issue.Parent, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return issue.Parent{}, err
	}
	cert := pair.Leaf
	if !cert.BasicConstraintsValid || !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return issue.Parent{}, errors.New("the certificate is not a CA that may sign certificates (basic constraints CA and key usage cert sign)")
	}
	switch k := pair.PrivateKey.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 2048 {
			return issue.Parent{}, fmt.Errorf("RSA key of %d bits is too small (minimum 2048)", k.N.BitLen())
		}
		return issue.Parent{Cert: cert, Key: k}, nil
	case *ecdsa.PrivateKey:
		return issue.Parent{Cert: cert, Key: k}, nil
	}
	return issue.Parent{}, fmt.Errorf("unsupported private key type %T (want RSA or ECDSA)", pair.PrivateKey)
}
