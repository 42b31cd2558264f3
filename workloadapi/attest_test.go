package workloadapi

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/attestor/field"
	"github.com/csi-agent/csi-agent/internal/rules"
)

type fixedAttestor attestor.Attributes

func (f fixedAttestor) Attest(context.Context, int32) (attestor.Attributes, error) {
	out := attestor.Attributes{}
	out.Merge(attestor.Attributes(f))
	return out, nil
}

// podAttestor answers with pod-level facts at once and with the container's
// once a caller waits for it, recording which it was asked for.
type podAttestor struct {
	pod, container attestor.Attributes
	waited         int
}

func (p *podAttestor) Attest(context.Context, int32) (attestor.Attributes, error) {
	p.waited++
	out := attestor.Attributes{}
	out.Merge(p.pod)
	out.Merge(p.container)
	return out, nil
}

func (p *podAttestor) AttestWithContainerWait(_ context.Context, _ int32, wait time.Duration) (attestor.Attributes, error) {
	if wait != 0 {
		p.waited++
	}
	out := attestor.Attributes{}
	out.Merge(p.pod)
	return out, nil
}

func TestAttestPIDWaitsForContainerOnlyWhenARuleNeedsIt(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	unix := fixedAttestor{field.UnixUID: {"1000"}, field.UnixGID: {"1000"}}
	pod := attestor.Attributes{field.K8sNamespace: {"shop"}, field.K8sServiceAccount: {"web"}}
	container := attestor.Attributes{field.K8sContainerID: {"c1"}, field.K8sContainerName: {"app"}}
	byNamespace := []rules.SVID{{SPIFFEID: "/ns/{kubernetes.namespace}", Rules: []rules.Rule{{Match: map[string]string{field.K8sNamespace: "shop"}}}}}
	byContainer := []rules.SVID{{SPIFFEID: "/app", Rules: []rules.Rule{{Match: map[string]string{field.K8sNamespace: "shop", field.K8sContainerName: "app"}}}}}
	otherNamespace := []rules.SVID{{SPIFFEID: "/app", Rules: []rules.Rule{{Match: map[string]string{field.K8sNamespace: "bank", field.K8sContainerName: "app"}}}}}
	for _, tc := range []struct {
		name          string
		svids         []rules.SVID
		noPods        bool
		wantWaits     int
		wantContainer bool
	}{
		{"no Kubernetes", byNamespace, true, 0, false},
		{"pod-level rule answers at once", byNamespace, false, 0, false},
		{"container rule waits", byContainer, false, 1, true},
		{"container rule that cannot match does not wait", otherNamespace, false, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			set, err := rules.Compile(td, tc.svids)
			if err != nil {
				t.Fatal(err)
			}
			pods := &podAttestor{pod: pod, container: container}
			s := &Server{unix: unix}
			if !tc.noPods {
				s.pods = pods
			}
			s.rules.Store(set)
			attrs, err := s.attestPID(context.Background(), 7)
			if err != nil {
				t.Fatal(err)
			}
			if !attrs.Has(field.UnixUID, "1000") {
				t.Errorf("unix facts lost: %s", attrs)
			}
			if got := attrs.Has(field.K8sNamespace, "shop"); got == tc.noPods {
				t.Errorf("pod facts: %s", attrs)
			}
			if got := attrs.Has(field.K8sContainerName, "app"); got != tc.wantContainer {
				t.Errorf("container facts %v, want %v: %s", got, tc.wantContainer, attrs)
			}
			if pods.waited != tc.wantWaits {
				t.Errorf("%d waits for the container, want %d", pods.waited, tc.wantWaits)
			}
		})
	}
}
