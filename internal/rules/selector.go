package rules

import (
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"strconv"
	"strings"
)

// op is how a condition tests the attributes.
type op uint8

const (
	// opEqual: some value of field equals value.
	opEqual op = iota
	// opEqualEither: some value of field or of field2 equals value.
	opEqualEither
	// opPair: at one index i, field[i] equals value and field2[i] equals
	// value2, so the kind of one owner cannot pair with the name of another.
	opPair
	// opPresent: field has exactly one value and it is not empty.
	opPresent
)

// condition is one precompiled test; a rule holds when all its conditions do.
// f and f2 index the Set's field table, filled in by Compile, so that each
// field is looked up once per evaluation however many rules test it.
type condition struct {
	op     op
	field  string
	value  string
	field2 string
	value2 string
	f, f2  int
}

// holds tests the condition against the looked-up values of the Set's fields.
func (c *condition) holds(vals [][]string) bool {
	switch c.op {
	case opEqual:
		return contains(vals[c.f], c.value)
	case opEqualEither:
		return contains(vals[c.f], c.value) || contains(vals[c.f2], c.value)
	case opPair:
		a, b := vals[c.f], vals[c.f2]
		if len(a) != len(b) {
			return false
		}
		for i := range a {
			if a[i] == c.value && b[i] == c.value2 {
				return true
			}
		}
		return false
	case opPresent:
		v := vals[c.f]
		return len(v) == 1 && v[0] != ""
	}
	return false
}

func contains(values []string, v string) bool {
	for _, x := range values {
		if x == v {
			return true
		}
	}
	return false
}

// valueKind says how a selector's value is checked and normalised.
type valueKind uint8

const (
	valueText   valueKind = iota // any non-empty text
	valueNumber                  // decimal, written canonically
	valueSHA256                  // 64 hex digits, lower-cased
)

// simpleSelectors maps "<type>:<name>" to the field its value is compared with.
var simpleSelectors = map[string]struct {
	field string
	kind  valueKind
}{
	"k8s:ns":                   {field.K8sNamespace, valueText},
	"k8s:sa":                   {field.K8sServiceAccount, valueText},
	"k8s:pod-name":             {field.K8sPodName, valueText},
	"k8s:pod-uid":              {field.K8sPodUID, valueText},
	"k8s:node-name":            {field.K8sNodeName, valueText},
	"k8s:container-name":       {field.K8sContainerName, valueText},
	"k8s:pod-image":            {field.K8sPodImage, valueText},
	"k8s:pod-init-image":       {field.K8sPodInitImage, valueText},
	"k8s:pod-image-count":      {field.K8sPodImageCount, valueNumber},
	"k8s:pod-init-image-count": {field.K8sPodInitImageCount, valueNumber},
	"k8s:pod-owner-uid":        {field.K8sPodOwnerUID, valueText},
	"unix:uid":                 {field.UnixUID, valueNumber},
	"unix:user":                {field.UnixUser, valueText},
	"unix:gid":                 {field.UnixGID, valueNumber},
	"unix:group":               {field.UnixGroup, valueText},
	"unix:supplementary_gid":   {field.UnixSupplementaryGID, valueNumber},
	"unix:supplementary_group": {field.UnixSupplementaryGroup, valueText},
	"unix:path":                {field.UnixPath, valueText},
	"unix:sha256":              {field.UnixSHA256, valueSHA256},
}

// parseSelector compiles a SPIRE-style selector "<type>:<name>:<value>".
// Only the type and name are split off: the value may itself hold ':'
// (image references with a tag or digest).
func parseSelector(s string) (condition, error) {
	typ, rest, ok1 := strings.Cut(s, ":")
	name, value, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return condition{}, fmt.Errorf("invalid selector %q: want <type>:<name>:<value>", s)
	}
	if typ != "k8s" && typ != "unix" {
		return condition{}, fmt.Errorf("unknown selector %q: type must be k8s or unix", s)
	}
	key := typ + ":" + name
	if sel, ok := simpleSelectors[key]; ok {
		v, err := normaliseValue(value, sel.kind)
		if err != nil {
			return condition{}, fmt.Errorf("selector %q: %w", s, err)
		}
		return condition{op: opEqual, field: sel.field, value: v}, nil
	}
	switch key {
	case "k8s:container-image":
		// As in SPIRE: the image as written in the pod spec, or its resolved ID.
		if value == "" {
			return condition{}, fmt.Errorf("selector %q: empty value", s)
		}
		return condition{op: opEqualEither, field: field.K8sContainerImage, field2: field.K8sContainerImageID, value: value}, nil
	case "k8s:pod-label":
		labelKey, labelValue, ok := strings.Cut(value, ":")
		if !ok {
			return condition{}, fmt.Errorf("selector %q: want k8s:pod-label:<key>:<value>", s)
		}
		if err := field.CheckLabelKey(labelKey); err != nil {
			return condition{}, fmt.Errorf("selector %q: %w", s, err)
		}
		// An empty label value is legal in Kubernetes and matches only a
		// label explicitly set to "".
		return condition{op: opEqual, field: field.PodLabel(labelKey), value: labelValue}, nil
	case "k8s:pod-owner":
		kind, ownerName, ok := strings.Cut(value, ":")
		if !ok || kind == "" || ownerName == "" {
			return condition{}, fmt.Errorf("selector %q: want k8s:pod-owner:<kind>:<name>", s)
		}
		return condition{op: opPair, field: field.K8sPodOwnerKind, value: kind, field2: field.K8sPodOwnerName, value2: ownerName}, nil
	}
	return condition{}, fmt.Errorf("unknown selector %q", s)
}

func normaliseValue(v string, kind valueKind) (string, error) {
	if v == "" {
		return "", fmt.Errorf("empty value")
	}
	switch kind {
	case valueNumber:
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return "", fmt.Errorf("value %q is not a number", v)
		}
		return strconv.FormatUint(n, 10), nil
	case valueSHA256:
		if len(v) != 64 {
			return "", fmt.Errorf("value %q is not a hex SHA-256 digest", v)
		}
		for i := 0; i < len(v); i++ {
			c := v[i]
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
				return "", fmt.Errorf("value %q is not a hex SHA-256 digest", v)
			}
		}
		return strings.ToLower(v), nil
	}
	return v, nil
}
