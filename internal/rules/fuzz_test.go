package rules

import (
	"github.com/csi-agent/csi-agent/attestor/field"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/attestor"
)

// attrsFor gives every field a template refers to the same value.
func attrsFor(t *template, value string) attestor.Attributes {
	a := attestor.Attributes{}
	for _, p := range t.parts {
		if p.field != "" {
			a.Set(p.field, value)
		}
	}
	return a
}

func FuzzCompileTemplate(f *testing.F) {
	for _, s := range []string{
		"/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}",
		"spiffe://example.org/{kubernetes.pod_label.app.kubernetes.io/name}",
		"spiffe://evil.org/{kubernetes.namespace}",
		"spiffe://{kubernetes.namespace}/x",
		"/{kubernetes.namespace}{unix.uid}",
		"/.{unix.user}",
		"{kubernetes.pod_name}.{kubernetes.namespace}.svc",
		"*.{kubernetes.namespace}.example.com",
		"/{", "/}", "/{}", "/{{a}}", "/a/../b", "//", "/%2F",
	} {
		for _, v := range []string{"payments", "..", ".", "a/b", "%2F", "A B", "", "x.y", "*"} {
			f.Add(s, v)
		}
	}
	f.Fuzz(func(t *testing.T, s, value string) {
		if it, err := compileIDTemplate(td, s); err == nil {
			attrs := attrsFor(&it.path, value)
			id, fail := it.render(attrs)
			if fail.reason == "" {
				checkRenderedID(t, id)
				// A value stays within its segment: the path has exactly as
				// many segments as the template.
				if got, want := strings.Count(id.Path(), "/"), strings.Count(it.path.sample(), "/"); got != want {
					t.Fatalf("template %q value %q rendered %q with %d segments, want %d", s, value, id, got, want)
				}
			}
			set, err := Compile(td, []SVID{{SPIFFEID: s, Rules: []Rule{{Selectors: []string{"unix:uid:4294967295"}}}}})
			if err != nil {
				t.Fatalf("compileIDTemplate accepted %q but Compile refused it: %v", s, err)
			}
			attrs.Set(field.UnixUID, "4294967295")
			for _, ident := range set.Evaluate(attrs) {
				checkRenderedID(t, ident.ID)
			}
		}
		if dt, err := compileDNSTemplate(s); err == nil {
			name, fail := dt.render(attrsFor(&dt.name, value))
			if fail.reason == "" {
				if err := checkDNSName(name); err != nil {
					t.Fatalf("template %q value %q rendered invalid DNS name %q: %v", s, value, name, err)
				}
				if got, want := strings.Count(name, "."), strings.Count(dt.name.sample(), "."); got != want {
					t.Fatalf("template %q value %q rendered %q with %d dots, want %d", s, value, name, got, want)
				}
				if strings.Contains(name[1:], "*") {
					t.Fatalf("template %q value %q rendered a wildcard %q", s, value, name)
				}
			}
		}
	})
}

func checkRenderedID(t *testing.T, id spiffeid.ID) {
	t.Helper()
	if !id.MemberOf(td) {
		t.Fatalf("rendered %q outside trust domain %q", id, td)
	}
	parsed, err := spiffeid.FromString(id.String())
	if err != nil || parsed != id {
		t.Fatalf("rendered %q does not parse back: %v", id, err)
	}
	if id.Path() == "" || len(id.String()) > maxIDLen {
		t.Fatalf("rendered %q: empty path or too long", id)
	}
}

func FuzzSelector(f *testing.F) {
	for _, s := range []string{
		"k8s:ns:default", "k8s:sa:api", "k8s:pod-label:app.kubernetes.io/name:web", "k8s:pod-label:a:",
		"k8s:container-image:ghcr.io/org/app:v1@sha256:" + strings.Repeat("ab", 32),
		"k8s:pod-owner:ReplicaSet:web-1", "k8s:pod-owner:ReplicaSet", "k8s:pod-image-count:007",
		"unix:uid:0", "unix:uid:-1", "unix:uid:4294967296", "unix:sha256:" + strings.Repeat("F", 64),
		"unix:path:/usr/bin/a:b", "k8s:foo:x", "k8s", "k8s:", "::", "unix::", "docker:id:x",
	} {
		f.Add(s, "x")
	}
	f.Fuzz(func(t *testing.T, s, value string) {
		c, err := parseSelector(s)
		if err != nil {
			return
		}
		if err := field.Check(c.field); err != nil {
			t.Fatalf("selector %q compiled to field %q: %v", s, c.field, err)
		}
		// A selector holds on exactly the facts it names.
		c.f, c.f2 = 0, 1
		attrs := attestor.Attributes{}
		attrs.Set(c.field, c.value)
		if c.field2 != "" {
			v := c.value2
			if c.op == opEqualEither {
				v = value
			}
			attrs.Set(c.field2, v)
		}
		if !c.holds([][]string{attrs[c.field], attrs[c.field2]}) {
			t.Fatalf("selector %q does not hold on its own facts %v", s, attrs)
		}
		// And not on other values, unless the value is the same.
		other := attestor.Attributes{}
		other.Set(c.field, value)
		if c.field2 != "" {
			other.Set(c.field2, value)
		}
		if c.holds([][]string{other[c.field], other[c.field2]}) && value != c.value && value != c.value2 {
			t.Fatalf("selector %q holds on unrelated value %q", s, value)
		}
		if _, err := Compile(td, []SVID{{SPIFFEID: "/a", Rules: []Rule{{Selectors: []string{s}}}}}); err != nil {
			t.Fatalf("parseSelector accepted %q but Compile refused it: %v", s, err)
		}
	})
}
