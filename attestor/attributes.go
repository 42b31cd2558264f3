// Package attestor holds the facts an attestor establishes about a Workload API
// caller and combines the Unix and Kubernetes attestors.
package attestor

import (
	"errors"
	"sort"
	"strings"
)

// Sentinel errors, mapped to gRPC codes only at the Workload API edge.
var (
	// ErrUnavailable: attestation could not be completed now (kubelet down,
	// pod not yet listed after the retry budget); the caller may retry.
	ErrUnavailable = errors.New("attestation unavailable")
	// ErrDenied: the caller was attested and must not receive any identity
	// (cross-check failed, caller outside our PID namespace, process gone).
	ErrDenied = errors.New("attestation denied")
)

// Attributes are the attested facts about a caller, keyed by field name such
// as "unix.uid" or "kubernetes.namespace". A field may hold several values
// (unix.supplementary_gids); an absent field has no values.
type Attributes map[string][]string

// Add appends values to a field.
func (a Attributes) Add(field string, values ...string) {
	a[field] = append(a[field], values...)
}

// Set replaces a field's values.
func (a Attributes) Set(field string, values ...string) {
	a[field] = append([]string(nil), values...)
}

// Get returns the field's value when it has exactly one.
func (a Attributes) Get(field string) (string, bool) {
	v := a[field]
	if len(v) != 1 {
		return "", false
	}
	return v[0], true
}

// Has reports whether the field holds the value.
func (a Attributes) Has(field, value string) bool {
	for _, v := range a[field] {
		if v == value {
			return true
		}
	}
	return false
}

// Merge copies every field of b into a.
func (a Attributes) Merge(b Attributes) {
	for k, v := range b {
		a.Add(k, v...)
	}
}

// String renders the attributes in a stable order, for audit lines.
func (a Attributes) String() string {
	keys := make([]string, 0, len(a))
	for k := range a {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(strings.Join(a[k], ","))
	}
	return b.String()
}
