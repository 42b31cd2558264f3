package ca

import "time"

// Expiry reports when the CA that signs intermediates (the self-managed
// root or the upstream CA) and the intermediate that signs leaves expire.
func (a *Authority) Expiry() (ca, intermediate time.Time) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.root.cert.NotAfter, a.inter.cert.NotAfter
}
