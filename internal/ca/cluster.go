package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// Cluster mode: the trust domain's root lives with a controller; the agent
// holds no root key. It makes its intermediate CA key and its JWT-SVID key on
// the node, has a ClusterSigner certify them, and trusts what a TrustSource
// publishes (the cluster's roots and every node's JWT key).

// ClusterSigner certifies keys made on this node. Both calls block until the
// certificate is issued, the request is refused, or ctx ends.
type ClusterSigner interface {
	// SignIntermediate returns the CA certificate issued for the PKCS#10
	// request csrDER, then any certificates between it and a root.
	SignIntermediate(ctx context.Context, csrDER []byte, ttl time.Duration) ([]*x509.Certificate, error)
	// RegisterJWTKey has the key of csrDER published as a JWT-SVID key and
	// returns the receipt: a certificate for that key, its NotAfter the
	// key's end in the published JWKS.
	RegisterJWTKey(ctx context.Context, csrDER []byte, ttl time.Duration) (*x509.Certificate, error)
}

// TrustSource is what the cluster publishes for the trust domain.
type TrustSource interface {
	// Trust returns the last roots and JWT keys seen; ok is false until
	// both were read once.
	Trust() (t Trust, ok bool)
	// Changed is closed at the next change of Trust.
	Changed() <-chan struct{}
}

// Trust is the trust domain's published trust: the bundle served.
type Trust struct {
	Roots   []*x509.Certificate
	JWTKeys []cluster.JWTKey
}

// ClusterOptions select cluster mode.
type ClusterOptions struct {
	NodeName string
	Signer   ClusterSigner
	Trust    TrustSource
}

// Files of cluster mode in Options.StateDir: a key and its certificate
// each, written in one rename, so that a restart without the API server
// serves on what it had.
const (
	IntermediateFile = "node-intermediate.pem"
	JWTKeyFile       = "node-jwt-key.pem"
	// TrustFile is the last trust seen (roots, then the JWKS): the bundle
	// until the trust source has listed after a start.
	TrustFile = "cluster-trust.pem"
)

const (
	// signTimeout bounds a wait for one request; then a new one is made.
	signTimeout = 5 * time.Minute
	// minBackoff and maxBackoff space out requests after failures.
	minBackoff = 2 * time.Second
	maxBackoff = 5 * time.Minute
)

// clusterState is cluster mode's part of an Authority. The fields below the
// line are guarded by Authority.mu.
type clusterState struct {
	nodeID  spiffeid.ID
	signer  ClusterSigner
	trust   TrustSource
	dir     string
	synced  bool // trust was read once
	roots   []*x509.Certificate
	kids    map[string]bool // published JWT key ids
	jwtKeys []heldJWTKey    // ours, newest last
	// reissue wakes the intermediate's renewal before its half life.
	reissue chan struct{}
	// jwtWaitUntil ends the wait of readiness for a published JWT key.
	jwtWaitUntil time.Time
}

// jwtReadyWait is how long, from its first intermediate, an agent stays
// not ready for want of a published JWT-SVID key. The key is normally
// published within a second; a JWT signer that never answers must not keep
// X.509-SVIDs from a node for ever.
const jwtReadyWait = 30 * time.Second

// heldJWTKey is a JWT-SVID key of ours with its receipt.
type heldJWTKey struct {
	key      *ecdsa.PrivateKey
	kid      string
	signer   jose.Signer
	notAfter time.Time
	rotateAt time.Time
}

func (a *Authority) newCluster(opts Options, now time.Time) error {
	co := opts.Cluster
	switch {
	case opts.UpstreamCertFile != "" || opts.UpstreamKeyFile != "":
		return errors.New("ca: cluster mode and upstream CA files exclude each other")
	case co.Signer == nil || co.Trust == nil:
		return errors.New("ca: cluster mode needs a signer and a trust source")
	case opts.StateDir == "":
		return errors.New("ca: state directory is required in cluster mode")
	}
	nodeID, err := cluster.NodeID(a.td, co.NodeName)
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	if err := mkdirPrivate(opts.StateDir); err != nil {
		return err
	}
	c := &clusterState{nodeID: nodeID, signer: co.Signer, trust: co.Trust, dir: opts.StateDir, kids: map[string]bool{},
		reissue: make(chan struct{}, 1)}
	a.cluster = c
	a.bundle = spiffebundle.New(a.td)
	if inter, err := c.loadKeyPair(IntermediateFile, now); err != nil {
		klog.ErrorS(err, "Persisted node intermediate not used; requesting a new one", "path", c.path(IntermediateFile))
	} else if inter != nil {
		a.inter, a.interRotateAt = inter, halfLife(inter.cert)
		c.jwtWaitUntil = now.Add(jwtReadyWait)
		klog.InfoS("Loaded node intermediate", "path", c.path(IntermediateFile),
			"serial", inter.cert.SerialNumber.Text(16), "expires", rfc3339(inter.cert.NotAfter))
	}
	if k, err := c.loadKeyPair(JWTKeyFile, now); err != nil {
		klog.ErrorS(err, "Persisted JWT-SVID key not used; registering a new one", "path", c.path(JWTKeyFile))
	} else if k != nil {
		h, err := newHeldJWTKey(k.key, k.cert)
		if err != nil {
			return err
		}
		c.jwtKeys = []heldJWTKey{h}
	}
	if t, ok := co.Trust.Trust(); ok {
		a.setTrustLocked(t)
	} else if t, err := loadTrust(c.path(TrustFile)); err != nil {
		klog.ErrorS(err, "Persisted trust bundle not used; waiting for the cluster's", "path", c.path(TrustFile))
	} else if t != nil {
		a.setTrustLocked(*t)
		klog.InfoS("Serving the persisted trust bundle until the cluster's is listed", "path", c.path(TrustFile))
	}
	return nil
}

func (c *clusterState) path(name string) string { return filepath.Join(c.dir, name) }

// loadKeyPair reads a persisted key and certificate of this node; nil when
// there is none. One for another node or trust domain (the config changed)
// is an error.
func (c *clusterState) loadKeyPair(name string, now time.Time) (*signingCA, error) {
	p, err := loadKeyPair(c.path(name), now)
	if err != nil || p == nil {
		return nil, err
	}
	if err := checkIssued(p.cert, p.key.(*ecdsa.PrivateKey), c.nodeID, now); err != nil {
		return nil, fmt.Errorf("ca: %s: %w", c.path(name), err)
	}
	return p, nil
}

// halfLife is when a certificate of ours is renewed.
func halfLife(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

func newHeldJWTKey(key crypto.Signer, receipt *x509.Certificate) (heldJWTKey, error) {
	ek, ok := key.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return heldJWTKey{}, fmt.Errorf("ca: JWT-SVID key is %T, want ECDSA P-256", key)
	}
	kid, signer, err := newJWTSigner(ek)
	if err != nil {
		return heldJWTKey{}, err
	}
	return heldJWTKey{key: ek, kid: kid, signer: signer, notAfter: receipt.NotAfter, rotateAt: halfLife(receipt)}, nil
}

// runCluster keeps the intermediate and the JWT key renewed and the bundle
// following the published trust, until ctx is done.
func (a *Authority) runCluster(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { a.followTrust(ctx) })
	wg.Go(func() {
		a.keepRenewed(ctx, "node intermediate", func() time.Time {
			a.mu.RLock()
			defer a.mu.RUnlock()
			if a.inter == nil || a.notYetValidLocked(a.now()) {
				return time.Time{}
			}
			return a.interRotateAt
		}, a.cluster.reissue, a.renewIntermediate)
	})
	wg.Go(func() {
		a.keepRenewed(ctx, "JWT-SVID key", func() time.Time {
			a.mu.RLock()
			defer a.mu.RUnlock()
			if n := len(a.cluster.jwtKeys); n > 0 {
				return a.cluster.jwtKeys[n-1].rotateAt
			}
			return time.Time{}
		}, nil, a.renewJWTKey)
	})
	wg.Wait()
	return nil
}

// keepRenewed calls renew whenever due (zero: now) has passed, or wake
// says so, backing off after failures, until ctx is done.
func (a *Authority) keepRenewed(ctx context.Context, what string, due func() time.Time, wake <-chan struct{}, renew func(context.Context) error) {
	backoff := minBackoff
	for {
		wait := min(due().Sub(a.now()), maxSleep)
		if wait <= 0 {
			sctx, cancel := context.WithTimeout(ctx, signTimeout)
			err := renew(sctx)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				backoff = minBackoff
				continue
			}
			klog.ErrorS(err, "Renewing from the cluster failed; serving on what is held meanwhile",
				"what", what, "trust_domain", a.td, "retry_in", backoff)
			wait, backoff = backoff, min(2*backoff, maxBackoff)
		}
		t := a.clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		case <-wake:
			t.Stop()
		}
	}
}

// followTrust takes every change of the published trust into the bundle.
func (a *Authority) followTrust(ctx context.Context) {
	for {
		ch := a.cluster.trust.Changed()
		if t, ok := a.cluster.trust.Trust(); ok {
			a.mu.Lock()
			a.setTrustLocked(t)
			a.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

// setTrustLocked makes t the bundle, firing Changed when it differs.
func (a *Authority) setTrustLocked(t Trust) {
	c := a.cluster
	b := spiffebundle.New(a.td)
	for _, r := range t.Roots {
		b.AddX509Authority(r)
	}
	kids := make(map[string]bool, len(t.JWTKeys))
	for _, k := range t.JWTKeys {
		// AddJWTAuthority fails only on an empty key id, which ParseJWKS refuses.
		_ = b.AddJWTAuthority(k.KeyID, k.Public)
		kids[k.KeyID] = true
	}
	c.roots, c.kids = slices.Clone(t.Roots), kids
	if a.inter != nil && len(c.roots) > 0 && !a.chainsLocked(a.inter.cert) && !a.interRotateAt.IsZero() {
		// Its issuer left the bundle: relying parties refuse what it signs.
		klog.InfoS("Node intermediate no longer chains to the trust bundle; renewing it now",
			"serial", a.inter.cert.SerialNumber.Text(16), "issuer", a.inter.cert.Issuer.String())
		a.interRotateAt = time.Time{}
		select {
		case c.reissue <- struct{}{}:
		default:
		}
	}
	first := !c.synced
	c.synced = true
	if first || !b.Equal(a.bundle) {
		a.bundle = b
		klog.InfoS("Trust bundle from the cluster", "trust_domain", a.td,
			"x509_authorities", len(t.Roots), "jwt_authorities", len(t.JWTKeys))
		if err := writeTrust(c.path(TrustFile), t); err != nil {
			klog.ErrorS(err, "Persisting the trust bundle failed; a restart without the API server will wait for it", "path", c.path(TrustFile))
		}
		a.fireChangedLocked()
	}
}

// renewIntermediate makes a new key, has it certified and takes it.
func (a *Authority) renewIntermediate(ctx context.Context) error {
	c := a.cluster
	key, csr, err := a.newRequest("csi-agent intermediate " + c.nodeID.Path())
	if err != nil {
		return err
	}
	chain, err := c.signer.SignIntermediate(ctx, csr, a.interTTL)
	if err != nil {
		return fmt.Errorf("ca: sign node intermediate: %w", err)
	}
	now := a.now()
	if len(chain) == 0 {
		return errors.New("ca: signer returned no certificate")
	}
	cert := chain[0]
	if err := checkIssued(cert, key, c.nodeID, now); err != nil {
		return fmt.Errorf("ca: node intermediate: %w", err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("ca: node intermediate is not a CA that may sign certificates")
	}
	if err := writeKeyPair(c.path(IntermediateFile), key, cert); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inter, a.interRotateAt = &signingCA{cert: cert, key: key}, halfLife(cert)
	if a.cluster.jwtWaitUntil.IsZero() {
		a.cluster.jwtWaitUntil = a.now().Add(jwtReadyWait)
	}
	a.fireChangedLocked()
	chains := a.chainsLocked(cert)
	klog.InfoS("Node intermediate issued by the cluster", "trust_domain", a.td,
		"serial", cert.SerialNumber.Text(16), "expires", rfc3339(cert.NotAfter), "rotate_at", rfc3339(a.interRotateAt))
	if !chains {
		klog.ErrorS(nil, "Node intermediate does not chain to a root of the trust bundle (yet); relying parties will refuse its SVIDs until it does",
			"serial", cert.SerialNumber.Text(16), "issuer", cert.Issuer.String())
	}
	return nil
}

// chainsLocked reports whether a root of the bundle signed cert.
func (a *Authority) chainsLocked(cert *x509.Certificate) bool {
	return a.issuerLocked(cert) != nil
}

func (a *Authority) issuerLocked(cert *x509.Certificate) *x509.Certificate {
	for _, r := range a.cluster.roots {
		if cert.CheckSignatureFrom(r) == nil {
			return r
		}
	}
	return nil
}

// renewJWTKey makes a new JWT-SVID key and has it registered. It signs only
// once its kid is published; until then the previous key does.
func (a *Authority) renewJWTKey(ctx context.Context) error {
	c := a.cluster
	key, csr, err := a.newRequest("csi-agent jwt-svid " + c.nodeID.Path())
	if err != nil {
		return err
	}
	receipt, err := c.signer.RegisterJWTKey(ctx, csr, a.interTTL)
	if err != nil {
		return fmt.Errorf("ca: register JWT-SVID key: %w", err)
	}
	if err := checkIssued(receipt, key, c.nodeID, a.now()); err != nil {
		return fmt.Errorf("ca: JWT-SVID key receipt: %w", err)
	}
	h, err := newHeldJWTKey(key, receipt)
	if err != nil {
		return err
	}
	if err := writeKeyPair(c.path(JWTKeyFile), key, receipt); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	// Keep the key that signs now: it does until the new one is published.
	var keys []heldJWTKey
	k, err := a.signingJWTKeyLocked(a.now())
	if err == nil {
		keys = append(keys, k)
	}
	c.jwtKeys = append(keys, h)
	if _, errNow := a.signingJWTKeyLocked(a.now()); err != nil && errNow == nil {
		// Published before we held it: JWT-SVIDs (and Ready) start now.
		a.fireChangedLocked()
	}
	klog.InfoS("JWT-SVID key registered with the cluster", "trust_domain", a.td, "kid", h.kid,
		"expires", rfc3339(h.notAfter), "published", c.kids[h.kid])
	return nil
}

// newRequest makes a P-256 key and a CSR for it naming this node.
func (a *Authority) newRequest(cn string) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: generate key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{Organization: []string{subjectOrg}, CommonName: cn},
		URIs:    []*url.URL{a.cluster.nodeID.URL()},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: certificate request: %w", err)
	}
	return key, csr, nil
}

// checkIssued checks that cert is for key, names id and is valid at now.
func checkIssued(cert *x509.Certificate, key *ecdsa.PrivateKey, id spiffeid.ID, now time.Time) error {
	if !key.PublicKey.Equal(cert.PublicKey) {
		return errors.New("certificate is not for the requested key")
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != id.String() {
		return fmt.Errorf("certificate does not name %s", id)
	}
	if now.Before(cert.NotBefore) || !now.Before(cert.NotAfter) {
		return fmt.Errorf("certificate is valid from %s to %s, not now", rfc3339(cert.NotBefore), rfc3339(cert.NotAfter))
	}
	return nil
}

// signingJWTKeyLocked is the key to sign a JWT-SVID with: the newest of
// ours that is published and unexpired.
func (a *Authority) signingJWTKeyLocked(now time.Time) (heldJWTKey, error) {
	c := a.cluster
	for _, k := range slices.Backward(c.jwtKeys) {
		if c.kids[k.kid] && now.Before(k.notAfter) {
			return k, nil
		}
	}
	if len(c.jwtKeys) == 0 {
		return heldJWTKey{}, errors.New("ca: no JWT-SVID key registered with the cluster yet")
	}
	return heldJWTKey{}, errors.New("ca: no JWT-SVID key of this node is published in the cluster's JWKS (yet)")
}

// Ready reports why the authority cannot issue, or nil: it needs an
// unexpired CA and intermediate and, in cluster mode, the cluster's trust
// bundle and, for up to jwtReadyWait from its first intermediate, a JWT-SVID
// key of this node published in it, so that a pod started once the agent is
// ready gets JWT-SVIDs as well as X.509-SVIDs. The other modes are ready
// from New on, while their CA is valid.
func (a *Authority) Ready() error {
	now := a.now()
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.readyLocked(now)
}

func (a *Authority) readyLocked(now time.Time) error {
	if a.cluster != nil && !a.cluster.synced {
		return errors.New("no trust bundle from the cluster yet")
	}
	if a.cluster != nil && len(a.cluster.roots) == 0 {
		return errors.New("the cluster's trust bundle holds no root")
	}
	if a.root != nil && !now.Before(a.root.cert.NotAfter) {
		return fmt.Errorf("CA expired at %s", rfc3339(a.root.cert.NotAfter))
	}
	if a.inter == nil {
		return errors.New("no signing intermediate yet")
	}
	if !now.Before(a.inter.cert.NotAfter) {
		return fmt.Errorf("intermediate expired at %s", rfc3339(a.inter.cert.NotAfter))
	}
	if a.cluster != nil && now.Before(a.cluster.jwtWaitUntil) {
		if _, err := a.signingJWTKeyLocked(now); err != nil {
			return fmt.Errorf("%w; waiting for it until %s, then X.509-SVIDs only", err, rfc3339(a.cluster.jwtWaitUntil))
		}
	}
	return nil
}

// WaitReady blocks until Ready reports nil or ctx is done.
func (a *Authority) WaitReady(ctx context.Context) error {
	for {
		ch := a.Changed()
		a.mu.RLock()
		now := a.now()
		err := a.readyLocked(now)
		var jwtWait time.Duration
		if err != nil && a.cluster != nil {
			jwtWait = a.cluster.jwtWaitUntil.Sub(now)
		}
		a.mu.RUnlock()
		if err == nil {
			return nil
		}
		// The wait for a JWT key ends on its own, with no change to tell.
		var waitEnd <-chan time.Time
		stop := func() bool { return false }
		if jwtWait > 0 {
			t := a.clock.NewTimer(jwtWait)
			waitEnd, stop = t.C(), t.Stop
		}
		select {
		case <-ctx.Done():
			stop()
			return ctx.Err()
		case <-ch:
		case <-waitEnd:
		}
		stop()
	}
}
