package rules

import (
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/attestor"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

const digest = "sha256:1b0e4f6c9d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4"

// podAttrs are the facts about a container of a payments pod.
func podAttrs() attestor.Attributes {
	a := attestor.Attributes{}
	a.Set("unix.pid", "4242")
	a.Set("unix.uid", "1000")
	a.Set("unix.gid", "2000")
	a.Set("unix.user", "app")
	a.Set("unix.group", "app")
	a.Set("unix.supplementary_gid", "10", "20")
	a.Set("unix.supplementary_group", "wheel", "video")
	a.Set("unix.path", "/usr/bin/api")
	a.Set("unix.sha256", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
	a.Set("kubernetes.namespace", "payments")
	a.Set("kubernetes.service_account", "api")
	a.Set("kubernetes.pod_name", "api-7d9f")
	a.Set("kubernetes.pod_uid", "0e6a4b8c-1d2f-4a5b-9c8d-7e6f5a4b3c2d")
	a.Set("kubernetes.pod_label.app", "api")
	a.Set("kubernetes.pod_label.app.kubernetes.io/instance", "db-1")
	a.Set("kubernetes.pod_label.empty", "")
	a.Set("kubernetes.node_name", "node-1")
	a.Set("kubernetes.pod_owner_kind", "ReplicaSet")
	a.Set("kubernetes.pod_owner_name", "api-7d9")
	a.Set("kubernetes.pod_owner_uid", "5f0c")
	a.Set("kubernetes.container_name", "api")
	a.Set("kubernetes.container_id", "abc123")
	a.Set("kubernetes.container_image", "ghcr.io/org/api:v1.2")
	a.Set("kubernetes.container_image_id", "ghcr.io/org/api@"+digest)
	a.Set("kubernetes.container_type", "container")
	a.Set("kubernetes.pod_image", "ghcr.io/org/api:v1.2", "envoyproxy/envoy:v1.30")
	a.Set("kubernetes.pod_image_count", "2")
	a.Set("kubernetes.pod_init_image", "busybox:1.36")
	a.Set("kubernetes.pod_init_image_count", "1")
	return a
}

func with(a attestor.Attributes, field string, values ...string) attestor.Attributes {
	b := attestor.Attributes{}
	for k, v := range a {
		b[k] = slices.Clone(v)
	}
	if len(values) == 0 {
		delete(b, field)
	} else {
		b.Set(field, values...)
	}
	return b
}

func mustCompile(t testing.TB, svids []SVID) *Set {
	t.Helper()
	set, err := Compile(td, svids)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return set
}

func ids(idents []Identity) []string {
	out := []string{}
	for _, id := range idents {
		out = append(out, id.ID.String())
	}
	return out
}

// selected builds one SVID "/ok" issued when sel (all of them) hold.
func selected(sel ...string) []SVID {
	return []SVID{{SPIFFEID: "/ok", Rules: []Rule{{Selectors: sel}}}}
}

func matched(m map[string]string) []SVID {
	return []SVID{{SPIFFEID: "/ok", Rules: []Rule{{Match: m}}}}
}

func TestEvaluateMatching(t *testing.T) {
	ok := []string{"spiffe://example.org/ok"}
	none := []string{}
	tests := []struct {
		name  string
		svids []SVID
		attrs attestor.Attributes
		want  []string
	}{
		{"match one field", matched(map[string]string{"kubernetes.namespace": "payments"}), podAttrs(), ok},
		{"match wrong value", matched(map[string]string{"kubernetes.namespace": "billing"}), podAttrs(), none},
		{"match all of several", matched(map[string]string{"kubernetes.namespace": "payments", "kubernetes.service_account": "api"}), podAttrs(), ok},
		{"match all of several, one fails", matched(map[string]string{"kubernetes.namespace": "payments", "kubernetes.service_account": "web"}), podAttrs(), none},
		{"match absent field", matched(map[string]string{"kubernetes.namespace": "payments"}), with(podAttrs(), "kubernetes.namespace"), none},
		{"match multi-valued any", matched(map[string]string{"unix.supplementary_gid": "20"}), podAttrs(), ok},
		{"match multi-valued none", matched(map[string]string{"unix.supplementary_gid": "30"}), podAttrs(), none},
		{"match label with prefix", matched(map[string]string{"kubernetes.pod_label.app.kubernetes.io/instance": "db-1"}), podAttrs(), ok},
		{"match empty label", matched(map[string]string{"kubernetes.pod_label.empty": ""}), podAttrs(), ok},
		{"match empty label absent", matched(map[string]string{"kubernetes.pod_label.missing": ""}), podAttrs(), none},
		{"match is exact, not prefix", matched(map[string]string{"kubernetes.namespace": "pay"}), podAttrs(), none},
		{"match is case sensitive", matched(map[string]string{"kubernetes.namespace": "Payments"}), podAttrs(), none},
		{"selectors all of", selected("k8s:ns:payments", "k8s:sa:api", "unix:uid:1000"), podAttrs(), ok},
		{"selectors all of, one fails", selected("k8s:ns:payments", "k8s:sa:api", "unix:uid:0"), podAttrs(), none},
		{"k8s:pod-name", selected("k8s:pod-name:api-7d9f"), podAttrs(), ok},
		{"k8s:pod-uid", selected("k8s:pod-uid:0e6a4b8c-1d2f-4a5b-9c8d-7e6f5a4b3c2d"), podAttrs(), ok},
		{"k8s:node-name", selected("k8s:node-name:node-1"), podAttrs(), ok},
		{"k8s:container-name", selected("k8s:container-name:api"), podAttrs(), ok},
		{"k8s:pod-label", selected("k8s:pod-label:app:api"), podAttrs(), ok},
		{"k8s:pod-label with prefix", selected("k8s:pod-label:app.kubernetes.io/instance:db-1"), podAttrs(), ok},
		{"k8s:pod-label wrong value", selected("k8s:pod-label:app:web"), podAttrs(), none},
		{"k8s:pod-label empty value", selected("k8s:pod-label:empty:"), podAttrs(), ok},
		{"k8s:pod-label empty value, label absent", selected("k8s:pod-label:missing:"), podAttrs(), none},
		{"k8s:container-image tag", selected("k8s:container-image:ghcr.io/org/api:v1.2"), podAttrs(), ok},
		{"k8s:container-image digest", selected("k8s:container-image:ghcr.io/org/api@" + digest), podAttrs(), ok},
		{"k8s:container-image other", selected("k8s:container-image:ghcr.io/org/api:v1.3"), podAttrs(), none},
		{"k8s:pod-image any", selected("k8s:pod-image:envoyproxy/envoy:v1.30"), podAttrs(), ok},
		{"k8s:pod-image none", selected("k8s:pod-image:busybox:1.36"), podAttrs(), none},
		{"k8s:pod-init-image", selected("k8s:pod-init-image:busybox:1.36"), podAttrs(), ok},
		{"k8s:pod-image-count", selected("k8s:pod-image-count:2"), podAttrs(), ok},
		{"k8s:pod-image-count wrong", selected("k8s:pod-image-count:3"), podAttrs(), none},
		{"k8s:pod-init-image-count", selected("k8s:pod-init-image-count:01"), podAttrs(), ok},
		{"k8s:pod-owner", selected("k8s:pod-owner:ReplicaSet:api-7d9"), podAttrs(), ok},
		{"k8s:pod-owner wrong kind", selected("k8s:pod-owner:Job:api-7d9"), podAttrs(), none},
		{"k8s:pod-owner pairs kind with its own name",
			selected("k8s:pod-owner:ReplicaSet:b"),
			with(with(podAttrs(), "kubernetes.pod_owner_kind", "ReplicaSet", "Job"), "kubernetes.pod_owner_name", "a", "b"), none},
		{"k8s:pod-owner second owner",
			selected("k8s:pod-owner:Job:b"),
			with(with(podAttrs(), "kubernetes.pod_owner_kind", "ReplicaSet", "Job"), "kubernetes.pod_owner_name", "a", "b"), ok},
		{"k8s:pod-owner uneven fields fail closed",
			selected("k8s:pod-owner:ReplicaSet:a"),
			with(with(podAttrs(), "kubernetes.pod_owner_kind", "ReplicaSet", "Job"), "kubernetes.pod_owner_name", "a"), none},
		{"k8s:pod-owner-uid", selected("k8s:pod-owner-uid:5f0c"), podAttrs(), ok},
		{"unix:uid canonical number", selected("unix:uid:01000"), podAttrs(), ok},
		{"unix:gid", selected("unix:gid:2000"), podAttrs(), ok},
		{"unix:user", selected("unix:user:app"), podAttrs(), ok},
		{"unix:group", selected("unix:group:app"), podAttrs(), ok},
		{"unix:supplementary_gid", selected("unix:supplementary_gid:10"), podAttrs(), ok},
		{"unix:supplementary_group", selected("unix:supplementary_group:video"), podAttrs(), ok},
		{"unix:supplementary_group none", selected("unix:supplementary_group:docker"), podAttrs(), none},
		{"unix:path", selected("unix:path:/usr/bin/api"), podAttrs(), ok},
		{"unix:sha256 upper case", selected("unix:sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"), podAttrs(), ok},
		{"unix selector on a non-pod", selected("unix:uid:1000"), attestor.Attributes{"unix.uid": {"1000"}}, ok},
		{"k8s selector on a non-pod", selected("k8s:ns:payments"), attestor.Attributes{"unix.uid": {"1000"}}, none},
		{"match and selectors in one rule",
			[]SVID{{SPIFFEID: "/ok", Rules: []Rule{{Match: map[string]string{"kubernetes.namespace": "payments"}, Selectors: []string{"k8s:sa:web"}}}}},
			podAttrs(), none},
		{"any of the rules",
			[]SVID{{SPIFFEID: "/ok", Rules: []Rule{{Selectors: []string{"k8s:ns:billing"}}, {Selectors: []string{"k8s:sa:api"}}}}},
			podAttrs(), ok},
		{"none of the rules",
			[]SVID{{SPIFFEID: "/ok", Rules: []Rule{{Selectors: []string{"k8s:ns:billing"}}, {Selectors: []string{"k8s:sa:web"}}}}},
			podAttrs(), none},
		{"no attributes at all", selected("k8s:ns:payments"), attestor.Attributes{}, none},
		{"nil attributes", selected("k8s:ns:payments"), nil, none},
		{"config order kept",
			[]SVID{
				{SPIFFEID: "/b", Rules: []Rule{{Selectors: []string{"k8s:ns:payments"}}}},
				{SPIFFEID: "/c", Rules: []Rule{{Selectors: []string{"k8s:ns:billing"}}}},
				{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:sa:api"}}}},
			},
			podAttrs(), []string{"spiffe://example.org/b", "spiffe://example.org/a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ids(mustCompile(t, tt.svids).Evaluate(tt.attrs))
			if !slices.Equal(got, tt.want) {
				t.Errorf("Evaluate = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestEvaluateTemplates(t *testing.T) {
	anyPod := []Rule{{Selectors: []string{"k8s:sa:api"}}}
	tests := []struct {
		name     string
		spiffeID string
		attrs    attestor.Attributes
		want     string // "" = nothing issued
	}{
		{"ns and sa", "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", podAttrs(), "spiffe://example.org/ns/payments/sa/api"},
		{"full form", "spiffe://example.org/ns/{kubernetes.namespace}", podAttrs(), "spiffe://example.org/ns/payments"},
		{"static", "/static", podAttrs(), "spiffe://example.org/static"},
		{"inside a segment", "/pod-{kubernetes.pod_name}.v1", podAttrs(), "spiffe://example.org/pod-api-7d9f.v1"},
		{"label with prefix", "/db/{kubernetes.pod_label.app.kubernetes.io/instance}", podAttrs(), "spiffe://example.org/db/db-1"},
		{"upper case kept verbatim", "/ns/{kubernetes.namespace}", with(podAttrs(), "kubernetes.namespace", "Payments"), "spiffe://example.org/ns/Payments"},
		{"dots inside a value", "/v/{kubernetes.pod_label.app}", with(podAttrs(), "kubernetes.pod_label.app", "1.2.3"), "spiffe://example.org/v/1.2.3"},
		{"absent field", "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}/{kubernetes.pod_label.tier}", podAttrs(), ""},
		{"absent label", "/app/{kubernetes.pod_label.tier}", podAttrs(), ""},
		{"multi-valued field", "/gid/{unix.supplementary_gid}", podAttrs(), ""},
		{"single value of a multi field", "/gid/{unix.supplementary_gid}", with(podAttrs(), "unix.supplementary_gid", "10"), "spiffe://example.org/gid/10"},
		{"empty value", "/app/{kubernetes.pod_label.empty}", podAttrs(), ""},
		{"image has slash and colon", "/img/{kubernetes.container_image}", podAttrs(), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set := mustCompile(t, []SVID{{SPIFFEID: tt.spiffeID, Rules: anyPod}})
			got := ids(set.Evaluate(tt.attrs))
			want := []string{}
			if tt.want != "" {
				want = []string{tt.want}
			}
			if !slices.Equal(got, want) {
				t.Errorf("Evaluate = %q, want %q", got, want)
			}
		})
	}
}

// TestEvaluateInjection feeds attribute values that try to escape their path
// segment or DNS label. None may produce an identity; a static SVID matched by
// the same rule is still issued, so a bad value does not deny unrelated ones.
func TestEvaluateInjection(t *testing.T) {
	values := []string{
		"../admin", "..", ".", "a/b", "/", "a/../b", "%2F", "a%2Fb", "%2e%2e",
		"a b", " ", "a\tb", "a\nb", "a\x00b", "é", "a:b", "a@b", "a?b", "a#b",
		"a\\b", "spiffe://evil.org/x", "a}b", "{kubernetes.namespace}", "", "a*",
	}
	svids := []SVID{
		{SPIFFEID: "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", Rules: []Rule{{Selectors: []string{"k8s:sa:api"}}}},
		{SPIFFEID: "/static", Rules: []Rule{{Selectors: []string{"k8s:sa:api"}}}},
	}
	set := mustCompile(t, svids)
	for _, v := range values {
		got := ids(set.Evaluate(with(podAttrs(), "kubernetes.namespace", v)))
		if !slices.Equal(got, []string{"spiffe://example.org/static"}) {
			t.Errorf("namespace %q: Evaluate = %q, want only the static SVID", v, got)
		}
	}

	dnsSet := mustCompile(t, []SVID{{
		SPIFFEID: "/web",
		DNSNames: []string{"{kubernetes.pod_label.svc}.example.com"},
		Rules:    []Rule{{Selectors: []string{"k8s:sa:api"}}},
	}})
	for _, v := range append(values, "Web", "a.b", "*", "-a", "a-", strings.Repeat("a", 64)) {
		if got := dnsSet.Evaluate(with(podAttrs(), "kubernetes.pod_label.svc", v)); len(got) != 0 {
			t.Errorf("label %q: Evaluate = %+v, want nothing", v, got)
		}
	}
	if got := dnsSet.Evaluate(with(podAttrs(), "kubernetes.pod_label.svc", "web-1")); len(got) != 1 || !slices.Equal(got[0].DNSNames, []string{"web-1.example.com"}) {
		t.Errorf("valid label: Evaluate = %+v", got)
	}
}

func TestEvaluateTooLongID(t *testing.T) {
	set := mustCompile(t, []SVID{{SPIFFEID: "/a/{kubernetes.pod_label.a}/{kubernetes.pod_label.b}", Rules: []Rule{{Selectors: []string{"k8s:sa:api"}}}}})
	long := strings.Repeat("x", 1100)
	attrs := with(with(podAttrs(), "kubernetes.pod_label.a", long), "kubernetes.pod_label.b", long)
	if got := set.Evaluate(attrs); len(got) != 0 {
		t.Errorf("Evaluate = %d identities for a %d-byte ID, want none", len(got), 2200)
	}
	attrs = with(with(podAttrs(), "kubernetes.pod_label.a", long), "kubernetes.pod_label.b", "y")
	if got := set.Evaluate(attrs); len(got) != 1 {
		t.Errorf("Evaluate = %d identities, want 1", len(got))
	}
}

func TestEvaluateDedupe(t *testing.T) {
	rule := []Rule{{Selectors: []string{"k8s:ns:payments"}}}
	tests := []struct {
		name      string
		svids     []SVID
		wantIDs   []string
		wantHints []string
	}{
		{
			name: "same ID, first wins",
			svids: []SVID{
				{SPIFFEID: "/ns/{kubernetes.namespace}", Hint: "first", Rules: rule},
				{SPIFFEID: "spiffe://example.org/ns/payments", Hint: "second", Rules: rule},
			},
			wantIDs:   []string{"spiffe://example.org/ns/payments"},
			wantHints: []string{"first"},
		},
		{
			name: "same hint, first wins",
			svids: []SVID{
				{SPIFFEID: "/a", Hint: "db", Rules: rule},
				{SPIFFEID: "/b", Hint: "db", Rules: rule},
				{SPIFFEID: "/c", Hint: "web", Rules: rule},
			},
			wantIDs:   []string{"spiffe://example.org/a", "spiffe://example.org/c"},
			wantHints: []string{"db", "web"},
		},
		{
			name: "empty hints are not duplicates",
			svids: []SVID{
				{SPIFFEID: "/a", Rules: rule},
				{SPIFFEID: "/b", Rules: rule},
			},
			wantIDs:   []string{"spiffe://example.org/a", "spiffe://example.org/b"},
			wantHints: []string{"", ""},
		},
		{
			name: "same hint on SVIDs that do not both match",
			svids: []SVID{
				{SPIFFEID: "/a", Hint: "db", Rules: []Rule{{Selectors: []string{"k8s:ns:billing"}}}},
				{SPIFFEID: "/b", Hint: "db", Rules: rule},
			},
			wantIDs:   []string{"spiffe://example.org/b"},
			wantHints: []string{"db"},
		},
		{
			name: "SVID whose template fails does not claim its ID or hint",
			svids: []SVID{
				{SPIFFEID: "/x/{kubernetes.pod_label.missing}", Hint: "db", Rules: rule},
				{SPIFFEID: "/b", Hint: "db", Rules: rule},
			},
			wantIDs:   []string{"spiffe://example.org/b"},
			wantHints: []string{"db"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := mustCompile(t, tt.svids).Evaluate(podAttrs())
			var hints []string
			for _, id := range got {
				hints = append(hints, id.Hint)
			}
			if !slices.Equal(ids(got), tt.wantIDs) || !slices.Equal(hints, tt.wantHints) {
				t.Errorf("Evaluate = %q hints %q, want %q hints %q", ids(got), hints, tt.wantIDs, tt.wantHints)
			}
		})
	}
}

func TestEvaluateDNSNames(t *testing.T) {
	rule := []Rule{{Selectors: []string{"k8s:ns:payments"}}}
	tests := []struct {
		name  string
		dns   []string
		attrs attestor.Attributes
		want  []string // nil = SVID not issued
	}{
		{"static", []string{"api.example.com", "localhost"}, podAttrs(), []string{"api.example.com", "localhost"}},
		{"templates", []string{"{kubernetes.service_account}.{kubernetes.namespace}.svc.cluster.local", "{kubernetes.pod_name}.pods"},
			podAttrs(), []string{"api.payments.svc.cluster.local", "api-7d9f.pods"}},
		{"wildcard", []string{"*.{kubernetes.namespace}.example.com"}, podAttrs(), []string{"*.payments.example.com"}},
		{"absent field drops the SVID", []string{"ok.example.com", "{kubernetes.pod_label.svc}.example.com"}, podAttrs(), nil},
		{"upper-case value drops the SVID", []string{"{kubernetes.namespace}.example.com"}, with(podAttrs(), "kubernetes.namespace", "Payments"), nil},
		{"label too long drops the SVID", []string{"{kubernetes.pod_label.app}.example.com"}, with(podAttrs(), "kubernetes.pod_label.app", strings.Repeat("a", 64)), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := mustCompile(t, []SVID{{SPIFFEID: "/web", DNSNames: tt.dns, Rules: rule}}).Evaluate(tt.attrs)
			if tt.want == nil {
				if len(got) != 0 {
					t.Fatalf("Evaluate = %+v, want nothing", got)
				}
				return
			}
			if len(got) != 1 || !slices.Equal(got[0].DNSNames, tt.want) {
				t.Fatalf("Evaluate = %+v, want DNS names %q", got, tt.want)
			}
		})
	}

	// The result is the caller's: changing it must not leak into the next call.
	set := mustCompile(t, []SVID{{SPIFFEID: "/web", DNSNames: []string{"api.example.com"}, Rules: rule}})
	set.Evaluate(podAttrs())[0].DNSNames[0] = "evil.example.com"
	if got := set.Evaluate(podAttrs())[0].DNSNames[0]; got != "api.example.com" {
		t.Errorf("DNS name after caller changed an earlier result = %q", got)
	}
}

func TestCompileErrors(t *testing.T) {
	ok := []Rule{{Selectors: []string{"k8s:ns:a"}}}
	tests := []struct {
		name  string
		svids []SVID
		want  string
	}{
		{"unknown selector", []SVID{{SPIFFEID: "/a", Rules: ok}, {SPIFFEID: "/b", Rules: ok}, {SPIFFEID: "/c", Rules: []Rule{{Selectors: []string{"k8s:ns:a", "k8s:foo:x"}}}}},
			`svids[2].rules[0].selectors[1]: unknown selector "k8s:foo:x"`},
		{"unknown selector type", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"docker:label:x"}}}}},
			`svids[0].rules[0].selectors[0]: unknown selector "docker:label:x": type must be k8s or unix`},
		{"selector without value", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:ns"}}}}},
			`svids[0].rules[0].selectors[0]: invalid selector "k8s:ns": want <type>:<name>:<value>`},
		{"selector empty value", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:ns:"}}}}},
			`svids[0].rules[0].selectors[0]: selector "k8s:ns:": empty value`},
		{"selector not a number", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"unix:uid:root"}}}}},
			`svids[0].rules[0].selectors[0]: selector "unix:uid:root": value "root" is not a number`},
		{"selector bad digest", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"unix:sha256:abc"}}}}},
			`svids[0].rules[0].selectors[0]: selector "unix:sha256:abc": value "abc" is not a hex SHA-256 digest`},
		{"pod-label without value", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:pod-label:app"}}}}},
			`svids[0].rules[0].selectors[0]: selector "k8s:pod-label:app": want k8s:pod-label:<key>:<value>`},
		{"pod-label bad key", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:pod-label:-bad:x"}}}}},
			`svids[0].rules[0].selectors[0]: selector "k8s:pod-label:-bad:x": invalid label key "-bad"`},
		{"pod-owner without name", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:pod-owner:ReplicaSet"}}}}},
			`svids[0].rules[0].selectors[0]: selector "k8s:pod-owner:ReplicaSet": want k8s:pod-owner:<kind>:<name>`},
		{"empty rule", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{"k8s:ns:a"}}, {}}}},
			`svids[0].rules[1]: needs match or selectors; an empty rule would match every workload`},
		{"no rules", []SVID{{SPIFFEID: "/a"}},
			`svids[0].rules: at least one rule is required`},
		{"unknown match field", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Match: map[string]string{"kubernetes.namespace": "a", "kubernetes.nmespace": "a"}}}}},
			`svids[0].rules[0].match: unknown field "kubernetes.nmespace"`},
		{"match bad label key", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Match: map[string]string{"kubernetes.pod_label.a b": "x"}}}}},
			`svids[0].rules[0].match: field "kubernetes.pod_label.a b": invalid label key "a b"`},
		{"match empty value", []SVID{{SPIFFEID: "/a", Rules: []Rule{{Match: map[string]string{"kubernetes.namespace": ""}}}}},
			`svids[0].rules[0].match["kubernetes.namespace"]: empty value`},
		{"empty spiffeID", []SVID{{Rules: ok}}, `svids[0].spiffeID: must not be empty`},
		{"foreign trust domain", []SVID{{SPIFFEID: "spiffe://evil.org/a", Rules: ok}},
			`svids[0].spiffeID: trust domain "evil.org" is not ours ("example.org")`},
		{"template in trust domain", []SVID{{SPIFFEID: "spiffe://{kubernetes.namespace}.example.org/a", Rules: ok}},
			`svids[0].spiffeID: placeholders are not allowed in the trust domain`},
		{"no path", []SVID{{SPIFFEID: "spiffe://example.org", Rules: ok}},
			`svids[0].spiffeID: path must not be empty: an SVID needs a workload path`},
		{"relative path", []SVID{{SPIFFEID: "ns/a", Rules: ok}},
			`svids[0].spiffeID: want "spiffe://example.org/..." or a path starting with "/"`},
		{"other scheme", []SVID{{SPIFFEID: "https://example.org/a", Rules: ok}},
			`svids[0].spiffeID: want "spiffe://example.org/..." or a path starting with "/"`},
		{"unclosed brace", []SVID{{SPIFFEID: "/ns/{kubernetes.namespace", Rules: ok}},
			`svids[0].spiffeID: unclosed '{' at offset 4`},
		{"nested brace", []SVID{{SPIFFEID: "/ns/{{kubernetes.namespace}}", Rules: ok}},
			`svids[0].spiffeID: unclosed '{' at offset 4`},
		{"stray closing brace", []SVID{{SPIFFEID: "spiffe://example.org/ns/a}", Rules: ok}},
			`svids[0].spiffeID: unmatched '}' at offset 25`},
		{"empty placeholder", []SVID{{SPIFFEID: "/ns/{}", Rules: ok}},
			`svids[0].spiffeID: empty placeholder '{}' at offset 4`},
		{"unknown placeholder", []SVID{{SPIFFEID: "/ns/{namespace}", Rules: ok}},
			`svids[0].spiffeID: placeholder at offset 4: unknown field "namespace"`},
		{"bad literal", []SVID{{SPIFFEID: "/ns/{kubernetes.namespace}/a b", Rules: ok}},
			`svids[0].spiffeID: invalid character ' ' at offset 28`},
		{"percent encoding", []SVID{{SPIFFEID: "/a%2Fb", Rules: ok}},
			`svids[0].spiffeID: invalid character '%' at offset 2`},
		{"empty segment", []SVID{{SPIFFEID: "/ns//{kubernetes.namespace}", Rules: ok}},
			`svids[0].spiffeID: invalid path "/ns//x": path cannot contain empty segments`},
		{"trailing slash", []SVID{{SPIFFEID: "/ns/{kubernetes.namespace}/", Rules: ok}},
			`svids[0].spiffeID: invalid path "/ns/x/": path cannot have a trailing slash`},
		{"dot segment", []SVID{{SPIFFEID: "/../{kubernetes.namespace}", Rules: ok}},
			`svids[0].spiffeID: invalid path "/../x": path cannot contain dot segments`},
		{"too long", []SVID{{SPIFFEID: "/" + strings.Repeat("a", 2048), Rules: ok}},
			`svids[0].spiffeID: longer than 2048 bytes`},
		{"bad DNS literal", []SVID{{SPIFFEID: "/a", DNSNames: []string{"ok.example.com", "API.example.com"}, Rules: ok}},
			`svids[0].dnsNames[1]: invalid character 'A' at offset 0`},
		{"DNS wildcard in the middle", []SVID{{SPIFFEID: "/a", DNSNames: []string{"a.*.example.com"}, Rules: ok}},
			`svids[0].dnsNames[0]: wildcard '*' only allowed as the whole first label, at offset 2`},
		{"DNS partial wildcard", []SVID{{SPIFFEID: "/a", DNSNames: []string{"a*.example.com"}, Rules: ok}},
			`svids[0].dnsNames[0]: wildcard '*' only allowed as the whole first label, at offset 1`},
		{"DNS empty label", []SVID{{SPIFFEID: "/a", DNSNames: []string{"{kubernetes.namespace}..example.com"}, Rules: ok}},
			`svids[0].dnsNames[0]: invalid DNS name "x..example.com": empty label`},
		{"DNS unknown placeholder", []SVID{{SPIFFEID: "/a", DNSNames: []string{"{ns}.example.com"}, Rules: ok}},
			`svids[0].dnsNames[0]: placeholder at offset 0: unknown field "ns"`},
		{"DNS empty", []SVID{{SPIFFEID: "/a", DNSNames: []string{""}, Rules: ok}},
			`svids[0].dnsNames[0]: must not be empty`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := Compile(td, tt.svids)
			if err == nil {
				t.Fatalf("Compile succeeded, want error %q", tt.want)
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("Compile error:\n got %q\nwant %q", err, tt.want)
			}
			if set != nil {
				t.Errorf("Compile returned a set with its error")
			}
		})
	}

	if _, err := Compile(spiffeid.TrustDomain{}, nil); err == nil {
		t.Error("Compile with an empty trust domain succeeded")
	}
}

func TestDefault(t *testing.T) {
	set := Default(td)
	tests := []struct {
		name  string
		attrs attestor.Attributes
		want  []string
	}{
		{"pod", podAttrs(), []string{"spiffe://example.org/ns/payments/sa/api"}},
		{"not a pod", attestor.Attributes{"unix.uid": {"0"}, "unix.pid": {"1"}}, []string{}},
		{"namespace without pod uid", attestor.Attributes{"kubernetes.namespace": {"a"}, "kubernetes.service_account": {"b"}}, []string{}},
		{"empty pod uid", with(podAttrs(), "kubernetes.pod_uid", ""), []string{}},
		{"no service account", with(podAttrs(), "kubernetes.service_account"), []string{}},
		{"bad namespace value", with(podAttrs(), "kubernetes.namespace", "a/b"), []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ids(set.Evaluate(tt.attrs)); !slices.Equal(got, tt.want) {
				t.Errorf("Evaluate = %q, want %q", got, tt.want)
			}
		})
	}
	if got := Default(spiffeid.TrustDomain{}).Evaluate(podAttrs()); len(got) != 0 {
		t.Errorf("Default(empty trust domain) issued %+v", got)
	}
	var nilSet *Set
	if got := nilSet.Evaluate(podAttrs()); got != nil {
		t.Errorf("nil set issued %+v", got)
	}
}

// TestYAML checks the JSON tags against the way the config package reads the
// file: strict, unknown fields refused.
func TestYAML(t *testing.T) {
	doc := `
- spiffeID: /ns/{kubernetes.namespace}/sa/{kubernetes.service_account}
  rules:
    - selectors: ["k8s:ns:payments"]
- spiffeID: spiffe://example.org/db/{kubernetes.pod_label.app.kubernetes.io/instance}
  hint: db
  dnsNames: ["{kubernetes.pod_name}.db.internal"]
  rules:
    - match: {kubernetes.namespace: payments, kubernetes.service_account: api}
    - selectors: ["k8s:pod-owner:StatefulSet:postgres", "k8s:container-image:ghcr.io/org/api:v1.2"]
`
	var svids []SVID
	if err := yaml.UnmarshalStrict([]byte(doc), &svids); err != nil {
		t.Fatalf("UnmarshalStrict: %v", err)
	}
	got := mustCompile(t, svids).Evaluate(podAttrs())
	want := []Identity{
		{ID: spiffeid.RequireFromString("spiffe://example.org/ns/payments/sa/api")},
		{ID: spiffeid.RequireFromString("spiffe://example.org/db/db-1"), Hint: "db", DNSNames: []string{"api-7d9f.db.internal"}},
	}
	if len(got) != len(want) {
		t.Fatalf("Evaluate = %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i].ID != want[i].ID || got[i].Hint != want[i].Hint || !slices.Equal(got[i].DNSNames, want[i].DNSNames) {
			t.Errorf("identity %d = %+v, want %+v", i, got[i], want[i])
		}
	}

	if err := yaml.UnmarshalStrict([]byte("- spiffeID: /a\n  selectors: [\"k8s:ns:a\"]\n"), &svids); err == nil {
		t.Error("UnmarshalStrict accepted selectors outside a rule")
	}
}

func TestPending(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	container := func(f string) bool { return strings.HasPrefix(f, "kubernetes.container_") }
	set, err := Compile(td, []SVID{
		{SPIFFEID: "/web-main", Rules: []Rule{{Selectors: []string{"k8s:ns:shop", "k8s:pod-label:app:web", "k8s:container-name:main"}}}},
		{SPIFFEID: "/by-container/{kubernetes.container_name}", Rules: []Rule{{Selectors: []string{"k8s:ns:batch"}}}},
		{SPIFFEID: "/ns/{kubernetes.namespace}", Rules: []Rule{{Selectors: []string{"k8s:sa:default"}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	pod := func(ns, app, sa string) attestor.Attributes {
		return attestor.Attributes{
			"kubernetes.namespace":       {ns},
			"kubernetes.pod_label.app":   {app},
			"kubernetes.service_account": {sa},
			"kubernetes.pod_uid":         {"u"},
		}
	}
	cases := []struct {
		name  string
		attrs attestor.Attributes
		want  bool
	}{
		{"rule needs the container and the pod fits", pod("shop", "web", "x"), true},
		{"rule needs the container but the pod does not fit", pod("shop", "api", "x"), false},
		{"template needs the container", pod("batch", "any", "x"), true},
		{"only pod-level rules apply", pod("other", "web", "default"), false},
		{"container already known", func() attestor.Attributes {
			a := pod("shop", "web", "x")
			a.Set("kubernetes.container_name", "sidecar")
			return a
		}(), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := set.Pending(tc.attrs, container); got != tc.want {
				t.Fatalf("Pending = %v, want %v", got, tc.want)
			}
		})
	}
	if Default(td).Pending(pod("a", "b", "c"), container) {
		t.Error("default rules wait for containers")
	}
}

func TestTwoPlaceholdersInOneSegmentRefused(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for _, tc := range []struct {
		svid SVID
		want string
	}{
		{SVID{SPIFFEID: "/{kubernetes.namespace}-{kubernetes.service_account}", Rules: []Rule{{Selectors: []string{"k8s:ns:a"}}}}, "svids[0].spiffeID: two placeholders in one path segment"},
		{SVID{SPIFFEID: "/x/{kubernetes.namespace}{kubernetes.pod_name}", Rules: []Rule{{Selectors: []string{"k8s:ns:a"}}}}, "svids[0].spiffeID: two placeholders in one path segment"},
		{SVID{SPIFFEID: "/x", DNSNames: []string{"{kubernetes.pod_name}-{kubernetes.namespace}.svc"}, Rules: []Rule{{Selectors: []string{"k8s:ns:a"}}}}, "svids[0].dnsNames[0]: two placeholders in one DNS label"},
	} {
		if _, err := Compile(td, []SVID{tc.svid}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.svid, err, tc.want)
		}
	}
	// One per segment or label is fine.
	if _, err := Compile(td, []SVID{{SPIFFEID: "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", DNSNames: []string{"{kubernetes.pod_name}.{kubernetes.namespace}.svc"}, Rules: []Rule{{Selectors: []string{"k8s:ns:a"}}}}}); err != nil {
		t.Fatal(err)
	}
}

func TestFederatesWith(t *testing.T) {
	partner := spiffeid.RequireTrustDomainFromString("partner.example")
	spire := spiffeid.RequireTrustDomainFromString("spire.test")
	ok := []Rule{{Selectors: []string{"k8s:ns:payments"}}}
	tests := []struct {
		name    string
		fed     []string
		want    []spiffeid.TrustDomain
		wantErr string
	}{
		{"none", nil, nil, ""},
		{"names and IDs", []string{"partner.example", "spiffe://spire.test"}, []spiffeid.TrustDomain{partner, spire}, ""},
		{"own trust domain", []string{"example.org"}, nil, `svids[0].federatesWith[0]: "example.org" is our own trust domain`},
		{"twice", []string{"partner.example", "spiffe://partner.example"}, nil, `svids[0].federatesWith[1]: "spiffe://partner.example" is listed twice`},
		{"with a path", []string{"spiffe://partner.example/x"}, nil, `svids[0].federatesWith[0]: "spiffe://partner.example/x": want a trust domain name`},
		{"invalid", []string{"Partner Example"}, nil, `svids[0].federatesWith[0]: "Partner Example": `},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := Compile(td, []SVID{{SPIFFEID: "/api", Rules: ok, FederatesWith: tt.fed}})
			if tt.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("Compile error = %v, want prefix %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := set.Evaluate(podAttrs())
			if len(got) != 1 || !slices.Equal(got[0].FederatesWith, tt.want) {
				t.Fatalf("Evaluate = %+v, want one identity federating with %v", got, tt.want)
			}
		})
	}
	var svids []SVID
	if err := yaml.UnmarshalStrict([]byte("- spiffeID: /a\n  federatesWith: [spire.test]\n  rules: [{selectors: [\"k8s:ns:payments\"]}]\n"), &svids); err != nil {
		t.Fatal(err)
	}
	if got := mustCompile(t, svids).Evaluate(podAttrs()); len(got) != 1 || !slices.Equal(got[0].FederatesWith, []spiffeid.TrustDomain{spire}) {
		t.Fatalf("YAML federatesWith: Evaluate = %+v", got)
	}
	if got := Default(td).Evaluate(podAttrs()); len(got) != 1 || got[0].FederatesWith != nil {
		t.Fatalf("default rules federate: %+v", got)
	}
}
