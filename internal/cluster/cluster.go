// Package cluster is the contract between the csi-agent controller and the
// node agents in cluster mode: the names of the Kubernetes objects they share
// and the format of what those objects hold. Both sides import it; it imports
// neither.
//
// The flow: a node agent generates its intermediate CA key (and its JWT-SVID
// key) on the node and asks for a certificate with a certificates.k8s.io/v1
// CertificateSigningRequest under IntermediateSigner (JWTKeySigner). The API
// server records who asked (the agent's service account) and, from the
// pod-bound token, on which node (NodeNameExtra). The controller checks both
// against the Node objects, signs with the trust domain's root (kept in a
// Secret only the controller reads), publishes the roots in a signer-linked
// ClusterTrustBundle (TrustBundleName) and every live node's JWT key in the
// JWKS ConfigMap; agents watch both.
package cluster

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Signer names and object names (each configurable; these are the defaults).
const (
	// IntermediateSigner issues node intermediate CAs (CSR usages: "cert
	// sign", optionally "crl sign"; nothing else).
	IntermediateSigner = "csi-agent.spiffe.io/node-intermediate"
	// JWTKeySigner registers a node's JWT-SVID signing key (CSR usage
	// "digital signature" only; ECDSA P-256). The issued certificate is a
	// receipt; what counts is the key's entry in the JWKS ConfigMap.
	JWTKeySigner = "csi-agent.spiffe.io/node-jwt-key"
	// SVIDSigner signs PodCertificateRequests; the trust bundle is linked to
	// it so that pods can project it with a clusterTrustBundle volume.
	SVIDSigner = "csi-agent.spiffe.io/svid"

	// RootSecret holds the root CA (kubernetes.io/tls: tls.crt, tls.key),
	// in the controller's namespace.
	RootSecret = "csi-agent-root-ca"
	// JWKSConfigMap holds every live node's JWT-SVID key (JWKSKey), in the
	// controller's namespace.
	JWKSConfigMap = "csi-agent-jwks"
	JWKSKey       = "keys.json"
	// Lease is the controller's leader-election lease.
	Lease = "csi-agent-controller"

	// NodeNameExtra is the user extra the API server sets from a pod-bound
	// (or node-bound) service account token: the node the pod runs on.
	NodeNameExtra = "authentication.kubernetes.io/node-name"
	// TrustDomainLabel is on the ClusterTrustBundle and the JWKS ConfigMap:
	// agents select by it.
	TrustDomainLabel = "csi-agent.spiffe.io/trust-domain"

	// ReasonDenied is the CSR Denied condition's reason; the message says what
	// failed in words a person can act on.
	ReasonDenied = "CSIAgentCheckFailed"
	// ReasonApproved is the CSR Approved condition's reason.
	ReasonApproved = "CSIAgentNodeVerified"
)

// nodePathPrefix is the path of a node's SPIFFE ID, under the trust domain.
const nodePathPrefix = "/csi-agent/node/"

// NodeID is the SPIFFE ID of a node: spiffe://<td>/csi-agent/node/<node>.
// A node intermediate carries it as its only URI SAN, and so does every CSR
// a node agent makes.
func NodeID(td spiffeid.TrustDomain, node string) (spiffeid.ID, error) {
	if node == "" {
		return spiffeid.ID{}, errors.New("cluster: node name is empty")
	}
	return spiffeid.FromPath(td, nodePathPrefix+node)
}

// NodeFromID returns the node an ID names, or an error when it is not a
// node ID of td.
func NodeFromID(td spiffeid.TrustDomain, id spiffeid.ID) (string, error) {
	if id.TrustDomain() != td {
		return "", fmt.Errorf("cluster: %s is not in trust domain %s", id, td)
	}
	node, ok := strings.CutPrefix(id.Path(), nodePathPrefix)
	if !ok || node == "" || strings.Contains(node, "/") {
		return "", fmt.Errorf("cluster: %s is not a node ID", id)
	}
	return node, nil
}

// TrustBundleName is the name of the signer-linked ClusterTrustBundle that
// holds td's roots: the signer name with "/" as ":", then ":" and the trust
// domain (Kubernetes requires that prefix for signer-linked bundles).
func TrustBundleName(signer string, td spiffeid.TrustDomain) string {
	return strings.ReplaceAll(signer, "/", ":") + ":" + td.Name()
}

// KeyID names a public key: base64url of the first 16 bytes of the SHA-256
// of its SubjectPublicKeyInfo. The agent signs JWT-SVIDs with this kid, the
// controller publishes the key under it.
func KeyID(pub any) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("cluster: key id: %w", err)
	}
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:16]), nil
}

// JWTKey is one node's JWT-SVID public key in the JWKS ConfigMap.
type JWTKey struct {
	Node     string
	KeyID    string
	Public   any       // *ecdsa.PublicKey
	NotAfter time.Time // the key leaves the JWKS after this
}

// jwksFile is the JSON in the ConfigMap's JWKSKey.
type jwksFile struct {
	Keys []jwksEntry `json:"keys"`
}

type jwksEntry struct {
	Node     string          `json:"node"`
	NotAfter time.Time       `json:"notAfter"`
	JWK      jose.JSONWebKey `json:"jwk"`
}

// MaxJWKSBytes bounds what ParseJWKS reads (a ConfigMap holds at most 1 MiB).
const MaxJWKSBytes = 1 << 20

// MarshalJWKS encodes keys, in the order given, for the ConfigMap.
func MarshalJWKS(keys []JWTKey) ([]byte, error) {
	f := jwksFile{Keys: make([]jwksEntry, 0, len(keys))}
	for _, k := range keys {
		f.Keys = append(f.Keys, jwksEntry{
			Node:     k.Node,
			NotAfter: k.NotAfter.UTC(),
			JWK:      jose.JSONWebKey{Key: k.Public, KeyID: k.KeyID, Algorithm: string(jose.ES256), Use: "jwt-svid"},
		})
	}
	return json.Marshal(f)
}

// ParseJWKS decodes the ConfigMap's JWKSKey. Every entry must be a public
// key whose kid is its KeyID and that names a node; otherwise it fails as
// a whole (the caller keeps what it had).
func ParseJWKS(data []byte) ([]JWTKey, error) {
	if len(data) > MaxJWKSBytes {
		return nil, fmt.Errorf("cluster: JWKS is %d bytes, over the %d limit", len(data), MaxJWKSBytes)
	}
	var f jwksFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("cluster: JWKS: %w", err)
	}
	out := make([]JWTKey, 0, len(f.Keys))
	seen := make(map[string]bool, len(f.Keys))
	for i, e := range f.Keys {
		if e.Node == "" {
			return nil, fmt.Errorf("cluster: JWKS key %d names no node", i)
		}
		if e.JWK.Key == nil || !e.JWK.IsPublic() {
			return nil, fmt.Errorf("cluster: JWKS key %d is not a public key", i)
		}
		kid, err := KeyID(e.JWK.Key)
		if err != nil {
			return nil, fmt.Errorf("cluster: JWKS key %d: %w", i, err)
		}
		if kid != e.JWK.KeyID {
			return nil, fmt.Errorf("cluster: JWKS key %d has kid %q, its key's id is %q", i, e.JWK.KeyID, kid)
		}
		if seen[kid] {
			return nil, fmt.Errorf("cluster: JWKS key %q appears twice", kid)
		}
		seen[kid] = true
		out = append(out, JWTKey{Node: e.Node, KeyID: kid, Public: e.JWK.Key, NotAfter: e.NotAfter})
	}
	return out, nil
}
