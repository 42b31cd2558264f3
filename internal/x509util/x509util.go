// Package x509util holds the two rules every certificate we sign follows,
// for the node agent's CA and the cluster controller alike.
package x509util

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"time"
)

// Validity is [now-backdate, now+ttl] clamped inside the parent's validity,
// in whole seconds (what X.509 encodes), so that no certificate outlives its
// issuer and none lasts longer than backdate+ttl. Truncating never crosses
// the parent's bounds: a parsed certificate's times are whole seconds.
func Validity(now time.Time, backdate, ttl time.Duration, parent *x509.Certificate) (notBefore, notAfter time.Time, err error) {
	if ttl <= 0 {
		return time.Time{}, time.Time{}, fmt.Errorf("lifetime %s is not positive", ttl)
	}
	notBefore = now.Add(-backdate)
	if notBefore.Before(parent.NotBefore) {
		notBefore = parent.NotBefore
	}
	notBefore = notBefore.Truncate(time.Second)
	notAfter = now.Add(ttl)
	if notAfter.After(parent.NotAfter) {
		notAfter = parent.NotAfter
	}
	notAfter = notAfter.Truncate(time.Second)
	if !notAfter.After(now) || !notAfter.After(notBefore) {
		return notBefore, notAfter, fmt.Errorf("issuing CA %q expires at %s, too soon to issue from",
			parent.Subject, parent.NotAfter.UTC().Format(time.RFC3339))
	}
	return notBefore, notAfter, nil
}

// Serial is a random positive 128-bit serial number.
func Serial() (*big.Int, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	b[0] &= 0x7f // positive in DER without a leading zero byte
	b[0] |= 0x40 // never zero, always the full 127 bits wide
	return new(big.Int).SetBytes(b), nil
}
