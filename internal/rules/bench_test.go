package rules

import (
	"fmt"
	"testing"
)

// benchSVIDs is a plausible large configuration: one SVID per team
// namespace, a few by label, image and Unix user, and the ns/sa catch-all.
func benchSVIDs() []SVID {
	var svids []SVID
	for i := range 40 {
		svids = append(svids, SVID{
			SPIFFEID: fmt.Sprintf("/team-%d/{kubernetes.service_account}", i),
			Hint:     fmt.Sprintf("team-%d", i),
			Rules: []Rule{
				{Match: map[string]string{"kubernetes.namespace": fmt.Sprintf("team-%d", i)}},
				{Selectors: []string{fmt.Sprintf("k8s:pod-label:team:%d", i), "k8s:sa:api"}},
			},
		})
	}
	for i := range 5 {
		svids = append(svids, SVID{
			SPIFFEID: fmt.Sprintf("/image-%d", i),
			Rules:    []Rule{{Selectors: []string{fmt.Sprintf("k8s:container-image:ghcr.io/org/image-%d:v1", i)}}},
		})
	}
	for i := range 4 {
		svids = append(svids, SVID{
			SPIFFEID: fmt.Sprintf("/host/uid-%d", i),
			Rules:    []Rule{{Selectors: []string{fmt.Sprintf("unix:uid:%d", 5000+i), "unix:path:/usr/bin/agent"}}},
		})
	}
	svids = append(svids, SVID{
		SPIFFEID: "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}",
		DNSNames: []string{"{kubernetes.service_account}.{kubernetes.namespace}.svc"},
		Rules:    []Rule{{Selectors: []string{"k8s:container-name:api"}}},
	})
	svids = append(svids, SVID{
		SPIFFEID: "/payments/api",
		Hint:     "payments",
		Rules:    []Rule{{Selectors: []string{"k8s:ns:payments", "k8s:sa:api"}}},
	})
	return svids
}

func BenchmarkEvaluate(b *testing.B) {
	set := mustCompile(b, benchSVIDs())
	cases := []struct {
		name  string
		attrs func() map[string][]string
		want  int
	}{
		{"pod-2-matches", func() map[string][]string { return podAttrs() }, 2},
		{"team-pod-template", func() map[string][]string {
			return with(podAttrs(), "kubernetes.namespace", "team-39")
		}, 2},
		{"no-match", func() map[string][]string {
			return map[string][]string{"unix.uid": {"1"}, "unix.gid": {"1"}, "unix.path": {"/bin/sh"}}
		}, 0},
	}
	for _, c := range cases {
		attrs := c.attrs()
		if got := len(set.Evaluate(attrs)); got != c.want {
			b.Fatalf("%s: %d identities, want %d", c.name, got, c.want)
		}
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				set.Evaluate(attrs)
			}
		})
	}
}
