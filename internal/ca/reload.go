package ca

import (
	"crypto"
	"crypto/ecdsa"
	"fmt"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"
)

// upstreamPollInterval is how often Run reads the upstream files. Kubelet
// takes a minute or more to update a mounted Secret, so this adds little.
const upstreamPollInterval = 5 * time.Second

// upstreamGrace is how long, beyond the life of what this agent signed with
// them, the previous upstream CA and JWT key stay in the bundle after a
// reload: agents on other nodes see the new Secret up to a few minutes later
// and sign with the old ones until then.
const upstreamGrace = 10 * time.Minute

// reloadUpstream reads the upstream files and, when they changed and hold a
// valid CA pair, issues from it. A broken pair (half written, mismatched,
// unparsable, expired) changes nothing. The same error is returned only once
// in a row, so the caller can log every error it gets; a pair that failed is
// parsed again on every call, so a not-yet-valid CA is taken once it is valid.
func (a *Authority) reloadUpstream() error {
	u := a.upstream
	certPEM, keyPEM, stable, err := u.read()
	if err == nil && !stable {
		return nil // mid-swap: the next poll sees the finished swap
	}
	var up *signingCA
	if err == nil {
		sum := contentSum(certPEM, keyPEM)
		if sum == u.sum && u.lastErr == "" {
			return nil
		}
		u.sum = sum
		up, err = u.parse(certPEM, keyPEM, a.td, a.now())
	}
	var j jwtSigning
	if err == nil {
		j, err = deriveJWTSigning(up.key, a.td, u.keyFile)
	}
	if err != nil {
		if msg := err.Error(); msg != u.lastErr {
			u.lastErr = msg
			return err
		}
		return nil
	}
	u.lastErr = ""

	a.mu.Lock()
	defer a.mu.Unlock()
	a.swapUpstreamLocked(up, j, a.now())
	return nil
}

// jwtSigning is a JWT-SVID key with its id and signer.
type jwtSigning struct {
	key    *ecdsa.PrivateKey
	kid    string
	signer jose.Signer
}

// deriveJWTSigning derives the JWT-SVID key from the upstream key in keyFile.
func deriveJWTSigning(upstream crypto.Signer, td spiffeid.TrustDomain, keyFile string) (jwtSigning, error) {
	key, err := deriveJWTKey(upstream, td)
	if err != nil {
		return jwtSigning{}, fmt.Errorf("ca: derive JWT-SVID key from %s: %w", keyFile, err)
	}
	kid, signer, err := newJWTSigner(key)
	if err != nil {
		return jwtSigning{}, err
	}
	return jwtSigning{key: key, kid: kid, signer: signer}, nil
}

// swapUpstreamLocked makes up the issuing CA, unless it already is, and
// re-issues the intermediate from it.
//
// The previous CA stays in the bundle for IntermediateTTL plus upstreamGrace
// (never past its expiry): every intermediate it signed, ours or another
// agent's that reloads within the grace, expires by then, and so do the
// leaves, which never outlive their intermediate. The previous JWT key stays
// for JWTSVIDTTL plus upstreamGrace on the same reasoning. Keeping them no
// longer means a CA replaced because it leaked stops being trusted soon.
func (a *Authority) swapUpstreamLocked(up *signingCA, j jwtSigning, now time.Time) {
	if up.cert.Equal(a.root.cert) {
		return
	}
	prev := a.root
	a.oldRoot = slices.DeleteFunc(a.oldRoot, func(r retiredRoot) bool { return r.cert.Equal(up.cert) })
	a.oldRoot = append(a.oldRoot, retiredRoot{cert: prev.cert, until: earlier(prev.cert.NotAfter, now.Add(a.interTTL+upstreamGrace))})
	a.root = up
	if j.kid != a.jwtKID {
		a.oldJWT = slices.DeleteFunc(a.oldJWT, func(k retiredJWT) bool { return k.kid == j.kid })
		a.oldJWT = append(a.oldJWT, retiredJWT{kid: a.jwtKID, key: &a.jwtKey.PublicKey, until: now.Add(a.jwtTTL + upstreamGrace)})
		a.jwtKey, a.jwtKID, a.jwtSigner = j.key, j.kid, j.signer
	}
	klog.InfoS("Reloaded upstream CA", "trust_domain", a.td, "cert_path", a.upstream.certFile,
		"subject", up.cert.Subject.String(), "serial", up.cert.SerialNumber.Text(16), "expires", rfc3339(up.cert.NotAfter),
		"previous_serial", prev.cert.SerialNumber.Text(16), "previous_trusted_until", rfc3339(a.oldRoot[len(a.oldRoot)-1].until))

	a.rebuildBundleLocked(now)
	a.interRotateAt, a.nextCheck = time.Time{}, time.Time{} // re-issue the intermediate now
	changed, err := a.rotateLocked(now)
	if err != nil {
		// The old intermediate, whose CA is still in the bundle, signs meanwhile.
		klog.ErrorS(err, "Issuing an intermediate from the reloaded upstream CA failed; will retry", "trust_domain", a.td, "retry_in", retryAfter)
	}
	if !changed {
		a.fireChangedLocked() // the bundle changed all the same
	}
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }
