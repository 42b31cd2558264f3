package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// value is the one series of name whose labels include want.
func value(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, s := range mf.Metric {
			labels := map[string]string{}
			for _, l := range s.Label {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue series
				}
			}
			return read(s), true
		}
	}
	return 0, false
}

func read(s *dto.Metric) float64 {
	switch {
	case s.Counter != nil:
		return s.Counter.GetValue()
	case s.Gauge != nil:
		return s.Gauge.GetValue()
	}
	return 0
}

func TestControllerMetrics(t *testing.T) {
	c := NewController("test")
	m := c.Registry()
	var expiry time.Time
	c.WatchRootExpiry(func() time.Time { return expiry })
	c.CSR("intermediate", "approved")
	c.CSR("intermediate", "approved")
	c.CSR("jwt-key", "issued")
	c.CSRDenied("san")
	c.Leader(true)
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"csi_agent_controller_csrs_total", map[string]string{"kind": "intermediate", "result": "approved"}, 2},
		{"csi_agent_controller_csrs_total", map[string]string{"kind": "jwt-key", "result": "issued"}, 1},
		{"csi_agent_controller_csr_denials_total", map[string]string{"reason": "san"}, 1},
		{"csi_agent_controller_leader", nil, 1},
		{"csi_agent_controller_root_expiry_timestamp_seconds", nil, 0},
	} {
		if got, ok := value(t, m, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
	expiry = time.Unix(1800000000, 0)
	c.Leader(false)
	if got, _ := value(t, m, "csi_agent_controller_root_expiry_timestamp_seconds", nil); got != 1800000000 {
		t.Errorf("root expiry %v, want 1800000000", got)
	}
	if got, _ := value(t, m, "csi_agent_controller_leader", nil); got != 0 {
		t.Errorf("leader %v after losing the lease", got)
	}
}

// Each command exports its own series only, plus the process's.
func TestRegistriesApart(t *testing.T) {
	names := func(g prometheus.Gatherer) map[string]bool {
		mfs, err := g.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, mf := range mfs {
			out[mf.GetName()] = true
		}
		return out
	}
	c := NewController("v1")
	c.CSR("intermediate", "approved")
	a := New("v1")
	a.StreamsOpen(1)
	a.Attested("unix", ResultOK)
	ctl, agent := names(c.Registry()), names(a.Registry())
	for _, n := range []string{"csi_agent_build_info", "go_goroutines"} {
		if !ctl[n] || !agent[n] {
			t.Errorf("%s: controller %v agent %v, want both", n, ctl[n], agent[n])
		}
	}
	for n := range ctl {
		if agent[n] && !strings.HasPrefix(n, "go_") && !strings.HasPrefix(n, "process_") && n != "csi_agent_build_info" {
			t.Errorf("%s is in both registries", n)
		}
	}
	for _, n := range []string{"csi_agent_workload_api_open_streams", "csi_agent_attestations_total"} {
		if ctl[n] {
			t.Errorf("the controller exports the agent's %s", n)
		}
	}
	if !ctl["csi_agent_controller_csrs_total"] || agent["csi_agent_controller_csrs_total"] {
		t.Error("controller_csrs_total belongs to the controller's registry only")
	}
}
