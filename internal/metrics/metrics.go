// Package metrics owns the agent's Prometheus registry and every metric it
// exports: names, help and labels are written here once. Components do not
// import it; each declares the small interface or hook it calls, and the
// wiring hands in a *Metrics. Every label value comes from a small fixed set
// chosen by the caller (a result, a reason, an operation): never a SPIFFE ID,
// a pod or a path, so the number of series stays bounded.
package metrics

import (
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const namespace = "csi_agent"

// Results: the values of every "result" label.
const (
	ResultOK          = "ok"
	ResultDenied      = "denied"
	ResultUnavailable = "unavailable"
	ResultError       = "error"
)

// base is a registry with the process's own series: the Go runtime's, the
// process's and build_info. Each command adds its own metrics to one.
type base struct {
	reg *prometheus.Registry
}

func newBase(version string) base {
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info",
		Help:        "Always 1; the labels tell csi-agent's version and the Go version that built it.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	buildInfo.Set(1)
	b := base{reg: prometheus.NewRegistry()}
	b.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildInfo)
	return b
}

// Registry is where every metric is registered.
func (b base) Registry() *prometheus.Registry { return b.reg }

// Metrics records the agent's metrics into its own registry. Its methods
// are safe for concurrent use.
type Metrics struct {
	base

	attestations    *prometheus.CounterVec
	denials         *prometheus.CounterVec
	svidsIssued     *prometheus.CounterVec
	svidRotations   *prometheus.CounterVec
	openStreams     prometheus.Gauge
	kubeletRequests *prometheus.CounterVec
	kubeletLatency  prometheus.Histogram
	csiOps          *prometheus.CounterVec
	csiLatency      *prometheus.HistogramVec
}

// New returns the agent's metrics (`csi-agent run`), registered in a new
// registry with the process's own series for version.
func New(version string) *Metrics {
	m := &Metrics{
		base: newBase(version),
		attestations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "attestations_total",
			Help: "Attestations of Workload API callers, by attestor (unix, k8s) and result (ok, unavailable, error).",
		}, []string{"attestor", "result"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "workload_api_denials_total",
			Help: "Workload API calls refused, and connections refused at the handshake, by reason.",
		}, []string{"reason"}),
		svidsIssued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "svids_issued_total",
			Help: "SVIDs minted, by type (x509, jwt); rotations included.",
		}, []string{"type"}),
		svidRotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "svid_rotations_total",
			Help: "SVIDs minted to replace a cached one, by type (x509, jwt).",
		}, []string{"type"}),
		openStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "workload_api_open_streams",
			Help: "Workload API streams open now.",
		}),
		kubeletRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "kubelet_requests_total",
			Help: "Pod list requests to the kubelet, by result (ok, error).",
		}, []string{"result"}),
		kubeletLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "kubelet_request_duration_seconds",
			Help:    "Time taken by a pod list request to the kubelet.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		csiOps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "csi_operations_total",
			Help: "CSI node calls, by operation (publish, unpublish) and result (ok, denied, unavailable, error).",
		}, []string{"operation", "result"}),
		csiLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "csi_operation_duration_seconds",
			Help:    "Time taken by a CSI node call, by operation (publish, unpublish).",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"operation"}),
	}
	m.reg.MustRegister(
		m.attestations, m.denials, m.svidsIssued, m.svidRotations, m.openStreams,
		m.kubeletRequests, m.kubeletLatency, m.csiOps, m.csiLatency,
	)
	return m
}

// Attested counts one attestation by attestor.
func (m *Metrics) Attested(attestor, result string) {
	m.attestations.WithLabelValues(attestor, result).Inc()
}

// Denied counts one refused Workload API call or connection.
func (m *Metrics) Denied(reason string) { m.denials.WithLabelValues(reason).Inc() }

// StreamsOpen adds delta to the open streams.
func (m *Metrics) StreamsOpen(delta int) { m.openStreams.Add(float64(delta)) }

// Minted counts one SVID minted of kind (x509, jwt); rotation: it replaced
// one the cache held.
func (m *Metrics) Minted(kind string, rotation bool) {
	m.svidsIssued.WithLabelValues(kind).Inc()
	if rotation {
		m.svidRotations.WithLabelValues(kind).Inc()
	}
}

// KubeletRequest records one pod list request.
func (m *Metrics) KubeletRequest(err error, d time.Duration) {
	result := ResultOK
	if err != nil {
		result = ResultError
	}
	m.kubeletRequests.WithLabelValues(result).Inc()
	m.kubeletLatency.Observe(d.Seconds())
}

// CSIOperation records one CSI call of op (publish, unpublish) that
// returned err, a gRPC status error or nil.
func (m *Metrics) CSIOperation(op string, err error, d time.Duration) {
	m.csiOps.WithLabelValues(op, Result(err)).Inc()
	m.csiLatency.WithLabelValues(op).Observe(d.Seconds())
}

// Result is the result label of a gRPC call that returned err.
func Result(err error) string {
	if err == nil {
		return ResultOK
	}
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition:
		return ResultDenied
	case codes.Unavailable, codes.ResourceExhausted, codes.Aborted, codes.DeadlineExceeded, codes.Canceled:
		return ResultUnavailable
	}
	return ResultError
}

// WatchRecords exports count() as the number of mount records.
func (m *Metrics) WatchRecords(count func() int) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Name: "mount_records",
		Help: "CSI mount records held: one per published volume.",
	}, func() float64 { return float64(count()) }))
}

// WatchExpiry exports when the CA (the root, or the upstream CA) and the
// signing intermediate expire, as told by expiry.
func (m *Metrics) WatchExpiry(expiry func() (ca, intermediate time.Time)) {
	for _, c := range []struct {
		name string
		pick func() time.Time
	}{
		{"ca", func() time.Time { t, _ := expiry(); return t }},
		{"intermediate", func() time.Time { _, t := expiry(); return t }},
	} {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "certificate_expiry_timestamp_seconds",
			Help:        "When a CA certificate of the agent expires (Unix time), by certificate (ca, intermediate).",
			ConstLabels: prometheus.Labels{"certificate": c.name},
		}, func() float64 { return float64(c.pick().Unix()) }))
	}
}
