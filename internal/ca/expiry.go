package ca

import "time"

// Expiry reports when the CA that signs intermediates (the self-managed
// root or the upstream CA) and the intermediate that signs leaves expire.
func (a *Authority) Expiry() (ca, intermediate time.Time) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.cluster != nil {
		// Zero for what is not held yet; the CA is the root that signed
		// the intermediate.
		if a.inter == nil {
			return time.Time{}, time.Time{}
		}
		if r := a.issuerLocked(a.inter.cert); r != nil {
			ca = r.NotAfter
		}
		return ca, a.inter.cert.NotAfter
	}
	return a.root.cert.NotAfter, a.inter.cert.NotAfter
}
