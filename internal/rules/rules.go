package rules

import (
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"slices"
	"sort"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
)

// SVID is one configured identity: the SPIFFE ID (and DNS names) a workload
// gets when any of the rules matches its attributes.
type SVID struct {
	// SPIFFEID is "spiffe://<our trust domain>/path" or just "/path"; the path
	// may hold placeholders such as {kubernetes.namespace}.
	SPIFFEID string `json:"spiffeID"`
	// Hint tells workloads holding several SVIDs which one this is.
	Hint string `json:"hint,omitempty"`
	// DNSNames become DNS SANs of the X.509-SVID; placeholders allowed.
	DNSNames []string `json:"dnsNames,omitempty"`
	// Rules: the SVID is issued when any rule matches.
	Rules []Rule `json:"rules"`
	// FederatesWith names the other trust domains ("example.org" or
	// "spiffe://example.org") whose bundles the SVID's holder receives, as
	// SPIRE's entries do. None: our own bundle only.
	FederatesWith []string `json:"federatesWith,omitempty"`
}

// Rule matches when every Match entry and every selector holds.
type Rule struct {
	// Match maps a field to the exact value it must have; a field with
	// several values holds when any of them is equal.
	Match map[string]string `json:"match,omitempty"`
	// Selectors are SPIRE-style selectors such as "k8s:ns:default".
	Selectors []string `json:"selectors,omitempty"`
}

// Identity is an SVID a workload is entitled to.
type Identity struct {
	ID       spiffeid.ID
	Hint     string
	DNSNames []string
	// FederatesWith are the trust domains whose bundles the holder receives.
	FederatesWith []spiffeid.TrustDomain
}

// Set is a compiled list of SVIDs. It is immutable and safe for concurrent use.
type Set struct {
	svids  []compiledSVID
	fields []string // every field a condition tests, once
}

type compiledSVID struct {
	index int // position in the configuration, for logs
	id    idTemplate
	hint  string
	dns   []dnsTemplate
	fed   []spiffeid.TrustDomain
	rules [][]condition // any of the rules; all conditions within one
}

// DefaultSPIFFEID is the template of the identity every attested pod gets
// when no SVIDs are configured.
const DefaultSPIFFEID = "/ns/{" + field.K8sNamespace + "}/sa/{" + field.K8sServiceAccount + "}"

// Compile checks and precompiles svids for trust domain td. Errors name the
// offending place, e.g. `svids[2].rules[0].selectors[1]: unknown selector "k8s:foo:x"`.
func Compile(td spiffeid.TrustDomain, svids []SVID) (*Set, error) {
	if td.IsZero() {
		return nil, errors.New("trust domain is empty")
	}
	set := &Set{svids: make([]compiledSVID, 0, len(svids))}
	for i, sv := range svids {
		c, err := compileSVID(td, i, sv)
		if err != nil {
			return nil, err
		}
		set.svids = append(set.svids, c)
	}
	set.indexFields()
	return set, nil
}

// indexFields numbers the fields the conditions test.
func (s *Set) indexFields() {
	index := map[string]int{}
	number := func(field string) int {
		if field == "" {
			return 0
		}
		n, ok := index[field]
		if !ok {
			n = len(s.fields)
			index[field] = n
			s.fields = append(s.fields, field)
		}
		return n
	}
	for i := range s.svids {
		for _, conds := range s.svids[i].rules {
			for k := range conds {
				conds[k].f = number(conds[k].field)
				conds[k].f2 = number(conds[k].field2)
			}
		}
	}
}

func compileSVID(td spiffeid.TrustDomain, i int, sv SVID) (compiledSVID, error) {
	id, err := compileIDTemplate(td, sv.SPIFFEID)
	if err != nil {
		return compiledSVID{}, fmt.Errorf("svids[%d].spiffeID: %w", i, err)
	}
	c := compiledSVID{index: i, id: id, hint: sv.Hint}
	if c.fed, err = compileFederatesWith(td, sv.FederatesWith); err != nil {
		return compiledSVID{}, fmt.Errorf("svids[%d].federatesWith%w", i, err)
	}
	for j, name := range sv.DNSNames {
		dt, err := compileDNSTemplate(name)
		if err != nil {
			return compiledSVID{}, fmt.Errorf("svids[%d].dnsNames[%d]: %w", i, j, err)
		}
		c.dns = append(c.dns, dt)
	}
	if len(sv.Rules) == 0 {
		return compiledSVID{}, fmt.Errorf("svids[%d].rules: at least one rule is required", i)
	}
	for j, r := range sv.Rules {
		conds, err := compileRule(r)
		if err != nil {
			return compiledSVID{}, fmt.Errorf("svids[%d].rules[%d]%w", i, j, err)
		}
		c.rules = append(c.rules, conds)
	}
	return c, nil
}

// compileFederatesWith returns errors that start with the place in the list.
func compileFederatesWith(own spiffeid.TrustDomain, names []string) ([]spiffeid.TrustDomain, error) {
	var out []spiffeid.TrustDomain
	for k, name := range names {
		td, err := spiffeid.TrustDomainFromString(name)
		if err == nil && name != td.Name() && name != td.IDString() {
			err = errors.New("want a trust domain name or spiffe://<name>, without a path")
		}
		if err != nil {
			return nil, fmt.Errorf("[%d]: %q: %w", k, name, err)
		}
		if td == own {
			return nil, fmt.Errorf("[%d]: %q is our own trust domain, whose bundle every SVID comes with", k, name)
		}
		if slices.Contains(out, td) {
			return nil, fmt.Errorf("[%d]: %q is listed twice", k, name)
		}
		out = append(out, td)
	}
	return out, nil
}

// compileRule returns errors that start with the place inside the rule
// (".match", ".selectors[1]", or ":" for the rule itself).
func compileRule(r Rule) ([]condition, error) {
	if len(r.Match) == 0 && len(r.Selectors) == 0 {
		return nil, errors.New(": needs match or selectors; an empty rule would match every workload")
	}
	conds := make([]condition, 0, len(r.Match)+len(r.Selectors))
	keys := make([]string, 0, len(r.Match))
	for k := range r.Match {
		keys = append(keys, k)
	}
	sort.Strings(keys) // stable error messages and evaluation order
	for _, k := range keys {
		if err := field.Check(k); err != nil {
			return nil, fmt.Errorf(".match: %w", err)
		}
		v := r.Match[k]
		// Only a label may legitimately be empty; for any other field an
		// empty value would match an attestor's gap, not a fact.
		if v == "" && !isLabelField(k) {
			return nil, fmt.Errorf(".match[%q]: empty value", k)
		}
		conds = append(conds, condition{op: opEqual, field: k, value: v})
	}
	for k, s := range r.Selectors {
		c, err := parseSelector(s)
		if err != nil {
			return nil, fmt.Errorf(".selectors[%d]: %w", k, err)
		}
		conds = append(conds, c)
	}
	return conds, nil
}

func isLabelField(name string) bool {
	return len(name) > len(field.K8sPodLabelPrefix) && name[:len(field.K8sPodLabelPrefix)] == field.K8sPodLabelPrefix
}

// Default returns the set used when no SVIDs are configured: every attested
// pod gets spiffe://<td>/ns/<namespace>/sa/<service account>. Callers that
// are not pods get nothing.
func Default(td spiffeid.TrustDomain) *Set {
	if td.IsZero() {
		return &Set{}
	}
	id, err := compileIDTemplate(td, DefaultSPIFFEID)
	if err != nil {
		// Only reachable if the constant above is broken; fail closed.
		klog.ErrorS(err, "Default SVID template does not compile")
		return &Set{}
	}
	set := &Set{svids: []compiledSVID{{
		id:    id,
		rules: [][]condition{{{op: opPresent, field: field.K8sPodUID}}},
	}}}
	set.indexFields()
	return set
}

// Evaluate returns the identities attrs are entitled to, in configuration
// order. When two SVIDs give the same ID, or the same non-empty hint, the
// first wins and the later one is left out.
func (s *Set) Evaluate(attrs attestor.Attributes) []Identity {
	if s == nil {
		return nil
	}
	var arr [32][]string
	vals := s.lookup(attrs, &arr)
	var out []Identity
	for i := range s.svids {
		sv := &s.svids[i]
		if !sv.matches(vals) {
			continue
		}
		id, f := sv.id.render(attrs)
		if f.reason != "" {
			sv.logSkip(f)
			continue
		}
		if dupID, dupHint := conflicts(out, id, sv.hint); dupID || dupHint {
			if dupHint && !dupID {
				if v := klog.V(1); v.Enabled() {
					v.InfoS("SVID left out: an earlier SVID for this workload has the same hint", "svid", sv.index, "spiffe_id", id, "hint", sv.hint)
				}
			}
			continue
		}
		dns, ok := sv.renderDNS(attrs)
		if !ok {
			continue
		}
		if out == nil {
			out = make([]Identity, 0, min(4, len(s.svids)-i))
		}
		out = append(out, Identity{ID: id, Hint: sv.hint, DNSNames: dns, FederatesWith: sv.fed})
	}
	return out
}

// Pending reports whether attrs could be entitled to more, or other,
// identities once the fields for which deferred is true arrive: some rule
// holds on every condition it can test now and waits only on an absent
// deferred field, or a rule holds and the SVID's ID or DNS template needs an
// absent deferred field. The Kubernetes attestor asks this before it waits
// for the kubelet to list a new container: most pods never need to.
func (s *Set) Pending(attrs attestor.Attributes, deferred func(field string) bool) bool {
	if s == nil {
		return false
	}
	var arr [32][]string
	vals := s.lookup(attrs, &arr)
	waiting := func(field string) bool {
		return field != "" && deferred(field) && len(attrs[field]) == 0
	}
	for i := range s.svids {
		sv := &s.svids[i]
		for _, conds := range sv.rules {
			held, unknown := true, false
			for k := range conds {
				c := &conds[k]
				if waiting(c.field) || waiting(c.field2) {
					unknown = true
					continue
				}
				if !c.holds(vals) {
					held = false
					break
				}
			}
			if !held {
				continue
			}
			if unknown || sv.anyTemplateField(waiting) {
				return true
			}
		}
	}
	return false
}

// lookup reads each field the conditions test once, into arr when it is
// large enough, which keeps common configurations off the heap.
func (s *Set) lookup(attrs attestor.Attributes, arr *[32][]string) [][]string {
	var vals [][]string
	if len(s.fields) <= len(arr) {
		vals = arr[:len(s.fields)]
	} else {
		vals = make([][]string, len(s.fields))
	}
	for k, f := range s.fields {
		vals[k] = attrs[f]
	}
	return vals
}

// anyTemplateField reports whether pred holds for a field the SVID's ID or
// DNS templates read.
func (sv *compiledSVID) anyTemplateField(pred func(string) bool) bool {
	for _, p := range sv.id.path.parts {
		if p.field != "" && pred(p.field) {
			return true
		}
	}
	for _, d := range sv.dns {
		for _, p := range d.name.parts {
			if p.field != "" && pred(p.field) {
				return true
			}
		}
	}
	return false
}

func (sv *compiledSVID) matches(vals [][]string) bool {
	for _, conds := range sv.rules {
		if allHold(conds, vals) {
			return true
		}
	}
	return false
}

func allHold(conds []condition, vals [][]string) bool {
	for k := range conds {
		if !conds[k].holds(vals) {
			return false
		}
	}
	return true
}

// renderDNS renders every DNS name, or none: an SVID short of a configured
// name would fail later in a way that is harder to trace.
func (sv *compiledSVID) renderDNS(attrs attestor.Attributes) ([]string, bool) {
	if len(sv.dns) == 0 {
		return nil, true
	}
	names := make([]string, len(sv.dns))
	for k := range sv.dns {
		name, f := sv.dns[k].render(attrs)
		if f.reason != "" {
			sv.logSkip(f)
			return nil, false
		}
		names[k] = name
	}
	return names, true
}

// conflicts reports whether out already holds id, or the non-empty hint.
func conflicts(out []Identity, id spiffeid.ID, hint string) (dupID, dupHint bool) {
	for k := range out {
		dupID = dupID || out[k].ID == id
		dupHint = dupHint || hint != "" && out[k].Hint == hint
	}
	return dupID, dupHint
}

func (sv *compiledSVID) logSkip(f renderFailure) {
	if v := klog.V(1); v.Enabled() {
		v.InfoS("SVID rule matched but its template rendered nothing; not issuing it",
			"svid", sv.index, "template", sv.id.path.raw, "field", f.field, "value", f.value, "reason", f.reason)
	}
}
