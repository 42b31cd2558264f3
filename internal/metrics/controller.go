package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Controller holds the metrics of `csi-agent controller`, in a registry of
// its own: the agent's series (streams, attestations, CSI) are not there.
type Controller struct {
	base
	csrs    *prometheus.CounterVec
	denials *prometheus.CounterVec
	leader  prometheus.Gauge
}

// NewController returns the controller's metrics, registered in a new
// registry with the process's own series for version.
func NewController(version string) *Controller {
	c := &Controller{
		base: newBase(version),
		csrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "controller_csrs_total",
			Help: "Node agent CSRs handled, by kind (intermediate, jwt-key) and result (approved, denied, issued, failed).",
		}, []string{"kind", "result"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "controller_csr_denials_total",
			Help: "Node agent CSRs denied (or, approved by others, not signed), by the check that failed.",
		}, []string{"reason"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "controller_leader",
			Help: "1 while this replica holds the controller lease, else 0.",
		}),
	}
	c.reg.MustRegister(c.csrs, c.denials, c.leader)
	return c
}

// CSR counts one CSR outcome.
func (c *Controller) CSR(kind, result string) { c.csrs.WithLabelValues(kind, result).Inc() }

// CSRDenied counts one denial by reason.
func (c *Controller) CSRDenied(reason string) { c.denials.WithLabelValues(reason).Inc() }

// Leader sets the leader gauge.
func (c *Controller) Leader(leading bool) {
	v := 0.0
	if leading {
		v = 1
	}
	c.leader.Set(v)
}

// WatchRootExpiry exports when the signing root expires, as told by expiry
// (zero while this replica does not lead: no series value then is 0).
func (c *Controller) WatchRootExpiry(expiry func() time.Time) {
	c.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "controller_root_expiry_timestamp_seconds",
		Help: "When the root CA that signs expires (Unix time); 0 while this replica does not lead.",
	}, func() float64 {
		t := expiry()
		if t.IsZero() {
			return 0
		}
		return float64(t.Unix())
	}))
}
