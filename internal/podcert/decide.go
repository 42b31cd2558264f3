package podcert

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Condition reasons of ours; the API's own (UnsupportedKeyType,
// InvalidUnverifiedUserAnnotations) are used where it defines one. The
// kubelet copies reason and message into a Warning event on the pod.
const (
	ReasonIssued = "CSIAgentIssued"
	// ReasonInvalidRequest: the request cannot be read (stub CSR, lifetime).
	ReasonInvalidRequest = "InvalidRequest"
	// ReasonPodMismatch: the pod is gone, was replaced, moved, finished, or
	// does not ask for our signer.
	ReasonPodMismatch = "PodMismatch"
	// ReasonNodeMismatch: the node is gone or was replaced.
	ReasonNodeMismatch = "NodeMismatch"
	// ReasonServiceAccountMismatch: the service account is gone or was replaced.
	ReasonServiceAccountMismatch = "ServiceAccountMismatch"
	// ReasonNoMatchingRule: no SVID rule matches the pod.
	ReasonNoMatchingRule = "NoMatchingRule"
	// ReasonLifetime (Failed): no lifetime of at least the API's minimum fits.
	ReasonLifetime = "LifetimeTooShort"
	// ReasonSigningFailed (Failed): the CA did not produce a usable chain.
	ReasonSigningFailed = "SigningFailed"
)

// HintAnnotation is the one unverifiedUserAnnotations key we read: the hint
// of the SVID to issue when the rules give the pod several.
const HintAnnotation = "csi-agent.spiffe.io/hint"

// API limits of PodCertificateRequests (certificates.k8s.io/v1, 1.37).
const (
	// MinLifetime is the shortest leaf lifetime the API server accepts.
	MinLifetime = time.Hour
	// DefaultMaxExpiration is what the API server defaults
	// spec.maxExpirationSeconds to.
	DefaultMaxExpiration = 24 * time.Hour
	// refreshMargin: beginRefreshAt must lie at least this far inside
	// [notBefore, notAfter].
	refreshMargin = 10 * time.Minute
)

// verdict is a terminal outcome other than Issued.
type verdict struct {
	Type    string // certv1.PodCertificateRequestConditionTypeDenied or ...Failed
	Reason  string
	Message string
}

func (v *verdict) Error() string { return v.Type + " (" + v.Reason + "): " + v.Message }

func denied(reason, format string, args ...any) *verdict {
	return &verdict{Type: certv1.PodCertificateRequestConditionTypeDenied, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

func failed(reason, format string, args ...any) *verdict {
	return &verdict{Type: certv1.PodCertificateRequestConditionTypeFailed, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// request is what a PodCertificateRequest asks for, read from its spec.
type request struct {
	pub         crypto.PublicKey
	hint        string
	maxLifetime time.Duration
}

// supportedKeys is what the message of an UnsupportedKeyType denial offers.
const supportedKeys = `use keyType "ECDSAP256" (or ECDSAP384, RSA3072, RSA4096) in the podCertificate volume`

// parseRequest reads the key, the annotations and the lifetime bound of a
// request. The stub CSR's signature is the proof of possession; the API
// server checks it at admission, we check it again because it is cheap and
// the key is what we certify. Everything else in the CSR is ignored: the
// identity comes from the rules, never from the requester.
func parseRequest(spec *certv1.PodCertificateRequestSpec) (request, *verdict) {
	var r request
	if len(spec.StubPKCS10Request) == 0 {
		return r, denied(ReasonInvalidRequest, "spec.stubPKCS10Request is empty; this signer needs the kubelet's stub CSR (Kubernetes 1.35 or newer)")
	}
	csr, err := x509.ParseCertificateRequest(spec.StubPKCS10Request)
	if err != nil {
		return r, denied(ReasonInvalidRequest, "spec.stubPKCS10Request is not a PKCS#10 request: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return r, denied(ReasonInvalidRequest, "spec.stubPKCS10Request signature does not verify, so it proves no key possession: %v", err)
	}
	if v := checkKey(csr.PublicKey); v != nil {
		return r, v
	}
	r.pub = csr.PublicKey

	for k, v := range spec.UnverifiedUserAnnotations {
		if k != HintAnnotation {
			return r, &verdict{
				Type:    certv1.PodCertificateRequestConditionTypeDenied,
				Reason:  certv1.PodCertificateRequestConditionInvalidUserConfig,
				Message: fmt.Sprintf("userAnnotations key %q is not one this signer knows; the only key is %q (the hint of the SVID to issue)", k, HintAnnotation),
			}
		}
		r.hint = v
	}

	r.maxLifetime = DefaultMaxExpiration
	if spec.MaxExpirationSeconds != nil {
		r.maxLifetime = time.Duration(*spec.MaxExpirationSeconds) * time.Second
	}
	if r.maxLifetime < MinLifetime {
		return r, denied(ReasonInvalidRequest, "spec.maxExpirationSeconds is %d, under the API minimum of %d", int64(r.maxLifetime/time.Second), int64(MinLifetime/time.Second))
	}
	return r, nil
}

// checkKey accepts the key types every TLS stack an SVID meets speaks:
// ECDSA P-256 and P-384, RSA 3072 and 4096. The kubelet also offers
// ECDSAP521 and ED25519, which many TLS peers (BoringSSL/Envoy defaults,
// older JVMs) reject; we deny those with the API's UnsupportedKeyType.
func checkKey(pub crypto.PublicKey) *verdict {
	unsupported := func(what string) *verdict {
		return &verdict{
			Type:    certv1.PodCertificateRequestConditionTypeDenied,
			Reason:  certv1.PodCertificateRequestConditionUnsupportedKeyType,
			Message: fmt.Sprintf("%s keys are not accepted for X.509-SVIDs; %s", what, supportedKeys),
		}
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return unsupported("ECDSA " + k.Curve.Params().Name)
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits == 3072 || bits == 4096 {
			return nil
		}
		return unsupported(fmt.Sprintf("RSA %d-bit", k.N.BitLen()))
	case ed25519.PublicKey:
		return unsupported("Ed25519")
	default:
		return unsupported(fmt.Sprintf("%T", pub))
	}
}

// objects are what the API holds now about the requester's pod; nil when
// not found.
type objects struct {
	pod  *corev1.Pod
	node *corev1.Node
	sa   *corev1.ServiceAccount
}

// mirrorPodAnnotation marks a static pod's API mirror; its spec is the
// node's word alone.
const mirrorPodAnnotation = "kubernetes.io/config.mirror"

// checkObjects compares the request with the pod, node and service account
// the API holds now. Admission checked the same at creation, for requests
// made by a node; this catches a pod, node or service account replaced
// since, and requests created by anyone else with create permission.
func checkObjects(pcr *certv1.PodCertificateRequest, signerName string, o objects) *verdict {
	s := &pcr.Spec
	podRef := pcr.Namespace + "/" + s.PodName
	switch p := o.pod; {
	case p == nil:
		return denied(ReasonPodMismatch, "pod %s no longer exists; its controller makes a new pod, whose kubelet asks again", podRef)
	case p.UID != s.PodUID:
		return denied(ReasonPodMismatch, "pod %s is now UID %s, not UID %s named in the request: the pod was replaced", podRef, p.UID, s.PodUID)
	case p.Spec.NodeName != string(s.NodeName):
		return denied(ReasonPodMismatch, "pod %s is on node %q, not on %q named in the request", podRef, p.Spec.NodeName, s.NodeName)
	case p.Spec.ServiceAccountName != s.ServiceAccountName:
		return denied(ReasonPodMismatch, "pod %s runs as service account %q, not %q named in the request", podRef, p.Spec.ServiceAccountName, s.ServiceAccountName)
	case p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed:
		return denied(ReasonPodMismatch, "pod %s has finished (phase %s)", podRef, p.Status.Phase)
	case p.Annotations[mirrorPodAnnotation] != "":
		return denied(ReasonPodMismatch, "pod %s is a static (mirror) pod; static pods get no pod certificates", podRef)
	case !mountsSigner(p, signerName):
		return denied(ReasonPodMismatch, "pod %s has no podCertificate projected volume with signerName %s; only pods that declare one get a certificate from this signer", podRef, signerName)
	}
	switch n := o.node; {
	case n == nil:
		return denied(ReasonNodeMismatch, "node %s no longer exists", s.NodeName)
	case n.UID != s.NodeUID:
		return denied(ReasonNodeMismatch, "node %s is now UID %s, not UID %s named in the request: the node was re-registered", s.NodeName, n.UID, s.NodeUID)
	}
	saRef := pcr.Namespace + "/" + s.ServiceAccountName
	switch sa := o.sa; {
	case sa == nil:
		return denied(ReasonServiceAccountMismatch, "service account %s no longer exists", saRef)
	case sa.UID != s.ServiceAccountUID:
		return denied(ReasonServiceAccountMismatch, "service account %s is now UID %s, not UID %s named in the request: it was re-created; restart the pod", saRef, sa.UID, s.ServiceAccountUID)
	}
	return nil
}

func mountsSigner(p *corev1.Pod, signerName string) bool {
	for i := range p.Spec.Volumes {
		proj := p.Spec.Volumes[i].Projected
		if proj == nil {
			continue
		}
		for j := range proj.Sources {
			if pc := proj.Sources[j].PodCertificate; pc != nil && pc.SignerName == signerName {
				return true
			}
		}
	}
	return false
}

// chooseIdentity evaluates the rules on the pod's attributes. With several
// identities, the hint picks one; without a hint the first in configuration
// order is issued (one certificate per volume).
func chooseIdentity(set *rules.Set, td spiffeid.TrustDomain, attrs attestor.Attributes, hint string, who string) (rules.Identity, *verdict) {
	ids := set.Evaluate(attrs)
	if len(ids) == 0 {
		return rules.Identity{}, denied(ReasonNoMatchingRule,
			"no SVID rule of trust domain %s matches %s; add a rule on pod-level fields (namespace, service account, pod name, labels, node, owner, images) to the controller's svids (rules on container fields never match a podCertificate request)",
			td, who)
	}
	if hint == "" {
		return ids[0], nil
	}
	i := slices.IndexFunc(ids, func(id rules.Identity) bool { return id.Hint == hint })
	if i < 0 {
		hints := make([]string, 0, len(ids))
		for _, id := range ids {
			hints = append(hints, fmt.Sprintf("%q", id.Hint))
		}
		return rules.Identity{}, &verdict{
			Type:    certv1.PodCertificateRequestConditionTypeDenied,
			Reason:  certv1.PodCertificateRequestConditionInvalidUserConfig,
			Message: fmt.Sprintf("%s is entitled to no SVID with hint %q (annotation %s); its hints are %s", who, hint, HintAnnotation, strings.Join(hints, ", ")),
		}
	}
	return ids[i], nil
}

// ttlFor is the lifetime to ask the CA for: the request's bound, and our
// cap when set (0 = none). Under the API minimum nothing can be issued.
func ttlFor(maxLifetime, maxTTL time.Duration) (time.Duration, *verdict) {
	ttl := maxLifetime
	if maxTTL > 0 && maxTTL < ttl {
		ttl = maxTTL
	}
	if ttl < MinLifetime {
		return 0, failed(ReasonLifetime, "the controller's podCertificates.maxTTL (%s) is under the API minimum lifetime of %s; raise it", maxTTL, MinLifetime)
	}
	return ttl, nil
}

// checkChain checks what the CA returned against what the API server will
// require, so that a bad chain becomes a Failed condition saying why rather
// than a rejected status update retried for ever.
func checkChain(chain []*x509.Certificate, pub crypto.PublicKey, id spiffeid.ID, maxLifetime time.Duration) *verdict {
	if len(chain) == 0 {
		return failed(ReasonSigningFailed, "the CA returned no certificate")
	}
	leaf := chain[0]
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if k, ok := pub.(equaler); !ok || !k.Equal(leaf.PublicKey) {
		return failed(ReasonSigningFailed, "the CA returned a certificate for another key")
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		return failed(ReasonSigningFailed, "the CA returned a certificate whose URI SANs are %v, not %s", leaf.URIs, id)
	}
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if life < MinLifetime {
		return failed(ReasonLifetime, "the trust domain's root CA expires at %s, less than the API minimum lifetime of %s after now; rotate the root", leaf.NotAfter.UTC().Format(time.RFC3339), MinLifetime)
	}
	if life > maxLifetime {
		return failed(ReasonSigningFailed, "the CA returned a certificate valid for %s, longer than the %s the request allows", life, maxLifetime)
	}
	return nil
}

// refreshAt is when the kubelet should begin to refresh: after fraction of
// the lifetime (half by default), kept 10 minutes inside the validity as
// the API requires. Whole seconds, as the API stores times.
func refreshAt(notBefore, notAfter time.Time, fraction float64) time.Time {
	life := notAfter.Sub(notBefore)
	at := notBefore.Add(time.Duration(float64(life) * fraction)).Truncate(time.Second)
	if lo := notBefore.Add(refreshMargin); at.Before(lo) {
		at = lo
	}
	if hi := notAfter.Add(-refreshMargin); at.After(hi) {
		at = hi
	}
	return at
}
