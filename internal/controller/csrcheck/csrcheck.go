// Package csrcheck decides a node agent's CertificateSigningRequest: the
// pure function from the request, the Node objects and the policy to
// approve (with what) or deny (saying why and what to do).
package csrcheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// Kind is what a CSR asks for.
type Kind int

const (
	KindUnknown Kind = iota
	// KindIntermediate is a node intermediate CA.
	KindIntermediate
	// KindJWTKey is the registration of a node's JWT-SVID key.
	KindJWTKey
)

// Denial reasons: a small fixed set (metric label values).
const (
	ReasonSigner         = "signer"
	ReasonServiceAccount = "service-account"
	ReasonNodeName       = "node-name"
	ReasonNodeMissing    = "node-missing"
	ReasonNodeDeleting   = "node-deleting"
	ReasonRequest        = "request"
	ReasonSAN            = "san"
	ReasonUsages         = "usages"
	ReasonKeyType        = "key-type"
)

// Policy is what the controller accepts.
type Policy struct {
	TrustDomain        spiffeid.TrustDomain
	IntermediateSigner string
	JWTKeySigner       string
	// AgentServiceAccounts are "namespace:name" of the node agents.
	AgentServiceAccounts []string
	// DefaultTTL applies when the CSR sets no expirationSeconds; MaxTTL
	// caps what it sets.
	DefaultTTL, MaxTTL time.Duration
}

// NodeGetter returns a Node, or an error apierrors.IsNotFound reports for a
// node that does not exist.
type NodeGetter func(name string) (*corev1.Node, error)

// Decision is the outcome for one CSR.
type Decision struct {
	Kind    Kind
	Approve bool
	// Reason (a Reason* constant) and Message say why a CSR is denied.
	Reason  string
	Message string
	// What to sign, when approved.
	Node   string
	ID     spiffeid.ID
	Public crypto.PublicKey
	TTL    time.Duration
}

// Decide checks csr. An error means it could not decide now (a lookup
// failed); try again later.
func Decide(csr *certv1.CertificateSigningRequest, nodes NodeGetter, p Policy) (Decision, error) {
	var d Decision
	deny := func(reason, format string, args ...any) (Decision, error) {
		d.Approve, d.Reason, d.Message = false, reason, fmt.Sprintf(format, args...)
		return d, nil
	}
	switch csr.Spec.SignerName {
	case p.IntermediateSigner:
		d.Kind = KindIntermediate
	case p.JWTKeySigner:
		d.Kind = KindJWTKey
	default:
		return deny(ReasonSigner, "signer %q is not one this controller serves (%s, %s)", csr.Spec.SignerName, p.IntermediateSigner, p.JWTKeySigner)
	}
	if !slices.Contains(serviceAccountUsers(p.AgentServiceAccounts), csr.Spec.Username) {
		return deny(ReasonServiceAccount, "requested by %q, which is not a node agent service account (%s): create the CSR with the agent's service account token, or add the account to controller.agentServiceAccounts",
			csr.Spec.Username, strings.Join(p.AgentServiceAccounts, ", "))
	}
	names := csr.Spec.Extra[cluster.NodeNameExtra]
	if len(names) != 1 || names[0] == "" {
		return deny(ReasonNodeName, "the requester's credentials carry %d values of %s, want exactly one: authenticate with a pod-bound service account token (the projected token of a pod, not a Secret-based or TokenRequest token without a pod)",
			len(names), cluster.NodeNameExtra)
	}
	node := names[0]
	d.Node = node
	n, err := nodes(node)
	switch {
	case apierrors.IsNotFound(err):
		return deny(ReasonNodeMissing, "node %q, where the requesting pod runs, does not exist", node)
	case err != nil:
		return d, fmt.Errorf("csrcheck: look up node %q: %w", node, err)
	case n.DeletionTimestamp != nil:
		return deny(ReasonNodeDeleting, "node %q is being deleted", node)
	}
	want, err := cluster.NodeID(p.TrustDomain, node)
	if err != nil {
		return deny(ReasonNodeName, "node name %q does not make a SPIFFE ID: %v", node, err)
	}
	d.ID = want
	req, err := ParseRequest(csr.Spec.Request)
	if err != nil {
		return deny(ReasonRequest, "spec.request: %v", err)
	}
	if len(req.DNSNames) > 0 || len(req.IPAddresses) > 0 || len(req.EmailAddresses) > 0 || len(req.URIs) != 1 {
		return deny(ReasonSAN, "the request must carry exactly one SAN, the URI %s; it has %d URI, %d DNS, %d IP and %d email SANs",
			want, len(req.URIs), len(req.DNSNames), len(req.IPAddresses), len(req.EmailAddresses))
	}
	if got := req.URIs[0].String(); got != want.String() {
		return deny(ReasonSAN, "the request's URI SAN is %s; a node agent on %q may only ask for %s", got, node, want)
	}
	if msg := checkUsages(d.Kind, csr.Spec.Usages); msg != "" {
		return deny(ReasonUsages, "%s", msg)
	}
	if msg := checkKey(d.Kind, req.PublicKey); msg != "" {
		return deny(ReasonKeyType, "%s", msg)
	}
	d.Public = req.PublicKey
	d.TTL = p.DefaultTTL
	if s := csr.Spec.ExpirationSeconds; s != nil {
		d.TTL = time.Duration(*s) * time.Second
	}
	if d.TTL > p.MaxTTL {
		d.TTL = p.MaxTTL
	}
	d.Approve = true
	return d, nil
}

func serviceAccountUsers(accounts []string) []string {
	out := make([]string, 0, len(accounts))
	for _, a := range accounts {
		out = append(out, "system:serviceaccount:"+a)
	}
	return out
}

// checkUsages: an intermediate needs "cert sign" and may add "crl sign";
// a JWT key has "digital signature" only.
func checkUsages(k Kind, usages []certv1.KeyUsage) string {
	var required, allowed []certv1.KeyUsage
	switch k {
	case KindIntermediate:
		required = []certv1.KeyUsage{certv1.UsageCertSign}
		allowed = []certv1.KeyUsage{certv1.UsageCertSign, certv1.UsageCRLSign}
	default:
		required = []certv1.KeyUsage{certv1.UsageDigitalSignature}
		allowed = required
	}
	for _, u := range usages {
		if !slices.Contains(allowed, u) {
			return fmt.Sprintf("usage %q is not allowed: set spec.usages to %q", u, allowed)
		}
	}
	for _, u := range required {
		if !slices.Contains(usages, u) {
			return fmt.Sprintf("usage %q is missing: set spec.usages to %q", u, allowed)
		}
	}
	return ""
}

// checkKey: intermediates ECDSA P-256/P-384 or RSA 2048-4096 bits; JWT keys
// ECDSA P-256 (ES256).
func checkKey(k Kind, pub crypto.PublicKey) string {
	switch key := pub.(type) {
	case *ecdsa.PublicKey:
		if key.Curve == elliptic.P256() || (k == KindIntermediate && key.Curve == elliptic.P384()) {
			return ""
		}
		return fmt.Sprintf("ECDSA curve %s is not allowed: use %s", key.Curve.Params().Name, allowedKeys(k))
	case *rsa.PublicKey:
		if bits := key.N.BitLen(); k == KindIntermediate && bits >= 2048 && bits <= 4096 {
			return ""
		}
		return fmt.Sprintf("an RSA key of %d bits is not allowed: use %s", key.N.BitLen(), allowedKeys(k))
	default:
		return fmt.Sprintf("key type %T is not allowed: use %s", pub, allowedKeys(k))
	}
}

func allowedKeys(k Kind) string {
	if k == KindIntermediate {
		return "ECDSA P-256 or P-384, or RSA of 2048 to 4096 bits"
	}
	return "ECDSA P-256"
}

// maxRequestBytes bounds a PKCS#10 request (a real one is under 2 KiB).
const maxRequestBytes = 64 << 10

// ParseRequest parses spec.request: exactly one PEM "CERTIFICATE REQUEST"
// block, nothing else, whose signature verifies (the requester holds the key).
func ParseRequest(data []byte) (*x509.CertificateRequest, error) {
	if len(data) > maxRequestBytes {
		return nil, fmt.Errorf("%d bytes, more than the %d a request may have", len(data), maxRequestBytes)
	}
	b, rest := pem.Decode(data)
	if b == nil {
		return nil, errors.New("no PEM block found")
	}
	if b.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("PEM block has type %q, want CERTIFICATE REQUEST", b.Type)
	}
	if len(strings.TrimSpace(string(rest))) > 0 {
		return nil, errors.New("data after the CERTIFICATE REQUEST block")
	}
	req, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse PKCS#10: %w", err)
	}
	if err := req.CheckSignature(); err != nil {
		return nil, fmt.Errorf("PKCS#10 signature: %w", err)
	}
	return req, nil
}
