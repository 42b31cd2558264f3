package metrics

import "github.com/prometheus/client_golang/prometheus"

// FederationFetches registers the count of bundle endpoint fetches and
// returns the hook that counts one, by result: ok or the reason it failed
// (unreachable, server_identity, http_status, too_large, malformed,
// trust_domain, sequence_backwards). Call it once.
func (m *Metrics) FederationFetches() func(result string) {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "federation_bundle_fetches_total",
		Help: "Fetches of federated trust domains' bundles from their bundle endpoints, by result (ok, or the reason the bundle was refused).",
	}, []string{"result"})
	m.reg.MustRegister(c)
	return func(result string) { c.WithLabelValues(result).Inc() }
}

// WatchFederation exports failing() as the number of bundle endpoints whose
// last fetch failed: their trust domains are served their last good bundle.
func (m *Metrics) WatchFederation(failing func() int) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "federation_bundle_endpoints_failing",
		Help: "Bundle endpoints whose last fetch failed; their trust domains keep their last good bundle.",
	}, func() float64 { return float64(failing()) }))
}
