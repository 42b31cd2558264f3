package controller

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

// TrustRevisions is the published trust with the revision of the objects
// it comes from (clusterca.Client).
type TrustRevisions interface {
	TrustRevision() (t ca.Trust, revision uint64, ok bool)
}

// Bundle is the trust domain's bundle as the controller's bundle endpoint
// serves it: the ClusterTrustBundle roots and the JWKS ConfigMap keys, the
// same the agents hand to workloads.
type Bundle struct {
	td    spiffeid.TrustDomain
	trust TrustRevisions
}

// NewBundle serves td's trust from trust.
func NewBundle(td spiffeid.TrustDomain, trust TrustRevisions) *Bundle {
	return &Bundle{td: td, trust: trust}
}

// Bundle is nil until the trust was read. Its sequence number is the
// objects' revision, so that every replica serves the same number for the
// same objects and it only grows (see clusterca.Client.TrustRevision).
func (b *Bundle) Bundle() *spiffebundle.Bundle {
	t, rev, ok := b.trust.TrustRevision()
	if !ok {
		return nil
	}
	out := spiffebundle.New(b.td)
	for _, r := range t.Roots {
		out.AddX509Authority(r)
	}
	for _, k := range t.JWTKeys {
		// Fails only on an empty key id, which ParseJWKS refuses.
		_ = out.AddJWTAuthority(k.KeyID, k.Public)
	}
	if rev > 0 {
		out.SetSequenceNumber(rev)
	}
	return out
}

// EndpointSVIDOptions configure EndpointSVIDs; internal/config owns the
// defaults.
type EndpointSVIDOptions struct {
	TrustDomain spiffeid.TrustDomain
	// Namespace and RootSecret locate the root Secret.
	Namespace, RootSecret string
	// TTL of the serving SVID; renewed at half life.
	TTL time.Duration
	// Now defaults to time.Now.
	Now func() time.Time
}

// secretReadTimeout bounds the root Secret read a TLS handshake may wait on.
const secretReadTimeout = 5 * time.Second

// EndpointSVIDs mint the bundle endpoint's X.509-SVID (https_spiffe) on
// every replica: the leader signs with the root it holds; a standby reads
// the root Secret (get only, never written) and signs with it, so that a
// Service in front of every replica stays up through a failover.
type EndpointSVIDs struct {
	client kubernetes.Interface
	holder *rootca.Holder
	o      EndpointSVIDOptions

	mu      sync.Mutex
	svid    *x509svid.SVID
	renewAt time.Time
}

// NewEndpointSVIDs signs with holder while it holds a root, else with the
// root read from the Secret.
func NewEndpointSVIDs(client kubernetes.Interface, holder *rootca.Holder, o EndpointSVIDOptions) *EndpointSVIDs {
	if o.Now == nil {
		o.Now = time.Now
	}
	return &EndpointSVIDs{client: client, holder: holder, o: o}
}

// X509SVID returns the cached SVID until its half life, then a new one; if
// signing fails, the cached one while it is still valid.
func (s *EndpointSVIDs) X509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (*x509svid.SVID, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.o.Now()
	if s.svid != nil && s.svid.ID == id && now.Before(s.renewAt) {
		return s.svid, false, nil
	}
	svid, err := s.sign(ctx, id, dnsNames)
	if err != nil {
		if s.svid != nil && s.svid.ID == id && now.Before(s.svid.Certificates[0].NotAfter) {
			klog.ErrorS(err, "Bundle endpoint: cannot renew its X.509-SVID; serving the current one", "spiffe_id", id.String(),
				"expires", s.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
			return s.svid, false, nil
		}
		return nil, false, err
	}
	leaf := svid.Certificates[0]
	s.svid, s.renewAt = svid, leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore)/2)
	klog.InfoS("Bundle endpoint: X.509-SVID signed", "spiffe_id", id.String(), "serial", leaf.SerialNumber.Text(16),
		"expires", leaf.NotAfter.UTC().Format(time.RFC3339))
	return svid, true, nil
}

func (s *EndpointSVIDs) sign(ctx context.Context, id spiffeid.ID, dnsNames []string) (*x509svid.SVID, error) {
	signer := s.holder
	if _, ok := signer.State(); !ok {
		var err error
		if signer, err = s.secretRoot(ctx); err != nil {
			return nil, err
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	chain, err := signer.SignSVID(ctx, key.Public(), id, dnsNames, s.o.TTL)
	if err != nil {
		return nil, fmt.Errorf("sign the bundle endpoint's SVID: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// secretRoot is a holder of the root Secret's current root (standby).
func (s *EndpointSVIDs) secretRoot(ctx context.Context) (*rootca.Holder, error) {
	ctx, cancel := context.WithTimeout(ctx, secretReadTimeout)
	defer cancel()
	sec, err := s.client.CoreV1().Secrets(s.o.Namespace).Get(ctx, s.o.RootSecret, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("root secret %s/%s: %w", s.o.Namespace, s.o.RootSecret, err)
	}
	st, err := rootca.Decode(sec.Data, sec.Annotations)
	if err != nil {
		return nil, fmt.Errorf("root secret %s/%s: %w", s.o.Namespace, s.o.RootSecret, err)
	}
	h := rootca.NewHolder(s.o.TrustDomain, s.o.Now)
	h.Set(st)
	return h, nil
}
