package rules

import (
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/attestor"
)

const (
	spiffeScheme = "spiffe://"
	// maxIDLen is the longest SPIFFE ID we generate; the spec asks verifiers
	// to support 2048 bytes and no more.
	maxIDLen = 2048
	// maxDNSNameLen is the longest DNS name (RFC 1035, without the root dot).
	maxDNSNameLen = 253
	maxLabelLen   = 63
	// sampleValue stands in for every placeholder when a template is checked
	// at compile time: the shortest value any placeholder can take.
	sampleValue = "x"
)

// part is a literal piece of a template or, when field is set, a placeholder.
type part struct {
	literal string
	field   string
}

// template is a parsed "{field}" template.
type template struct {
	raw          string
	parts        []part
	placeholders int
}

// parseTemplate splits s into literals and placeholders and checks the
// placeholders name known fields. offset is added to positions in errors so
// they point into the string the user wrote.
func parseTemplate(s string, offset int) (template, error) {
	t := template{raw: s}
	lit := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '}':
			return template{}, fmt.Errorf("unmatched '}' at offset %d", offset+i)
		case '{':
			end := strings.IndexAny(s[i+1:], "{}")
			if end < 0 || s[i+1+end] == '{' {
				return template{}, fmt.Errorf("unclosed '{' at offset %d", offset+i)
			}
			name := s[i+1 : i+1+end]
			if name == "" {
				return template{}, fmt.Errorf("empty placeholder '{}' at offset %d", offset+i)
			}
			if err := field.Check(name); err != nil {
				return template{}, fmt.Errorf("placeholder at offset %d: %w", offset+i, err)
			}
			if lit < i {
				t.parts = append(t.parts, part{literal: s[lit:i]})
			}
			t.parts = append(t.parts, part{field: name})
			t.placeholders++
			i += 1 + end
			lit = i + 1
		}
	}
	if lit < len(s) {
		t.parts = append(t.parts, part{literal: s[lit:]})
	}
	return t, nil
}

// checkLiterals reports the first literal byte ok refuses.
func (t *template) checkLiterals(offset int, ok func(c byte) bool) error {
	pos := offset
	for _, p := range t.parts {
		if p.field != "" {
			pos += len(p.field) + 2
			continue
		}
		for i := 0; i < len(p.literal); i++ {
			if !ok(p.literal[i]) {
				return fmt.Errorf("invalid character %q at offset %d", p.literal[i], pos+i)
			}
		}
		pos += len(p.literal)
	}
	return nil
}

// sample renders the template with sampleValue in every placeholder.
func (t *template) sample() string {
	var b strings.Builder
	for _, p := range t.parts {
		if p.field != "" {
			b.WriteString(sampleValue)
		} else {
			b.WriteString(p.literal)
		}
	}
	return b.String()
}

// renderFailure says why a template rendered nothing. The zero value means
// it rendered.
type renderFailure struct {
	field  string
	value  string
	reason string
}

const (
	reasonAbsent       = "field absent"
	reasonMultiValued  = "field has several values"
	reasonBadValue     = "value not allowed in this position"
	reasonInvalidID    = "rendered SPIFFE ID invalid"
	reasonTooLong      = "rendered value too long"
	reasonInvalidName  = "rendered DNS name invalid"
	reasonForeignTrust = "rendered SPIFFE ID outside our trust domain"
)

// appendRendered appends the rendered template to buf, substituting each
// placeholder with the field's single value when valueOK accepts it.
func (t *template) appendRendered(buf []byte, attrs attestor.Attributes, valueOK func(string) bool) ([]byte, renderFailure) {
	for _, p := range t.parts {
		if p.field == "" {
			buf = append(buf, p.literal...)
			continue
		}
		values := attrs[p.field]
		switch {
		case len(values) == 0:
			return buf, renderFailure{field: p.field, reason: reasonAbsent}
		case len(values) > 1:
			return buf, renderFailure{field: p.field, reason: reasonMultiValued}
		case !valueOK(values[0]):
			return buf, renderFailure{field: p.field, value: values[0], reason: reasonBadValue}
		}
		buf = append(buf, values[0]...)
	}
	return buf, renderFailure{}
}

// idTemplate renders SPIFFE IDs of one trust domain. Placeholders can only
// appear in the path, and each value must fit inside a single path segment,
// so an attribute value can neither add segments nor leave the trust domain.
type idTemplate struct {
	td     spiffeid.TrustDomain
	prefix string // "spiffe://<td>"
	path   template
	static spiffeid.ID // set when the template has no placeholders
}

func compileIDTemplate(td spiffeid.TrustDomain, s string) (idTemplate, error) {
	if s == "" {
		return idTemplate{}, errors.New("must not be empty")
	}
	path, offset := s, 0
	if rest, ok := strings.CutPrefix(s, spiffeScheme); ok {
		tdName, _, _ := strings.Cut(rest, "/")
		if strings.ContainsAny(tdName, "{}") {
			return idTemplate{}, errors.New("placeholders are not allowed in the trust domain")
		}
		got, err := spiffeid.TrustDomainFromString(tdName)
		if err != nil {
			return idTemplate{}, fmt.Errorf("invalid trust domain %q: %w", tdName, err)
		}
		if got != td {
			return idTemplate{}, fmt.Errorf("trust domain %q is not ours (%q)", tdName, td.Name())
		}
		offset = len(spiffeScheme) + len(tdName)
		path = rest[len(tdName):]
	} else if !strings.HasPrefix(s, "/") {
		return idTemplate{}, fmt.Errorf("want %q or a path starting with \"/\"", spiffeScheme+td.Name()+"/...")
	}
	if path == "" {
		return idTemplate{}, errors.New("path must not be empty: an SVID needs a workload path")
	}
	t, err := parseTemplate(path, offset)
	if err != nil {
		return idTemplate{}, err
	}
	if err := t.checkLiterals(offset, isPathLiteralChar); err != nil {
		return idTemplate{}, err
	}
	if err := t.onePlaceholderPer('/', "path segment"); err != nil {
		return idTemplate{}, err
	}
	prefix := spiffeScheme + td.Name()
	sample := t.sample()
	if err := spiffeid.ValidatePath(sample); err != nil {
		return idTemplate{}, fmt.Errorf("invalid path %q: %w", sample, err)
	}
	if len(prefix)+len(sample) > maxIDLen {
		return idTemplate{}, fmt.Errorf("longer than %d bytes", maxIDLen)
	}
	it := idTemplate{td: td, prefix: prefix, path: t}
	if t.placeholders == 0 {
		id, err := spiffeid.FromString(prefix + path)
		if err != nil {
			return idTemplate{}, err
		}
		it.static = id
	}
	return it, nil
}

// render returns the ID for attrs, or why there is none.
func (it *idTemplate) render(attrs attestor.Attributes) (spiffeid.ID, renderFailure) {
	if !it.static.IsZero() {
		return it.static, renderFailure{}
	}
	var arr [256]byte
	buf := append(arr[:0], it.prefix...)
	buf, f := it.path.appendRendered(buf, attrs, isPathValue)
	if f.reason != "" {
		return spiffeid.ID{}, f
	}
	if len(buf) > maxIDLen {
		return spiffeid.ID{}, renderFailure{reason: reasonTooLong}
	}
	id, err := spiffeid.FromString(string(buf))
	if err != nil {
		return spiffeid.ID{}, renderFailure{value: string(buf), reason: reasonInvalidID}
	}
	// Cannot happen by construction; checked anyway because the price of
	// being wrong is an identity in someone else's trust domain.
	if !id.MemberOf(it.td) {
		return spiffeid.ID{}, renderFailure{value: id.String(), reason: reasonForeignTrust}
	}
	return id, renderFailure{}
}

// onePlaceholderPer refuses two placeholders in one segment: values may hold
// the characters that would separate them, so {namespace}-{service_account}
// renders "team-a-web" for both team-a/web and team/a-web.
func (t template) onePlaceholderPer(sep byte, unit string) error {
	n := 0
	for _, p := range t.parts {
		if p.field == "" {
			if strings.IndexByte(p.literal, sep) >= 0 {
				n = 0
			}
			continue
		}
		if n++; n > 1 {
			return fmt.Errorf("two placeholders in one %s ({%s}): two workloads could render the same name; give each placeholder its own %s", unit, p.field, unit)
		}
	}
	return nil
}

// isPathLiteralChar accepts the bytes a SPIFFE ID path may hold, whatever
// build tags go-spiffe was compiled with.
func isPathLiteralChar(c byte) bool {
	return c == '/' || isSegmentChar(c)
}

func isSegmentChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_'
}

// isPathValue accepts an attribute value that stays inside one path segment.
// Case is kept as is: lowering it could make two workloads share an ID.
func isPathValue(v string) bool {
	if v == "" || v == "." || v == ".." {
		return false
	}
	for i := 0; i < len(v); i++ {
		if !isSegmentChar(v[i]) {
			return false
		}
	}
	return true
}

// dnsTemplate renders DNS SAN names.
type dnsTemplate struct {
	name   template
	static string
}

func compileDNSTemplate(s string) (dnsTemplate, error) {
	if s == "" {
		return dnsTemplate{}, errors.New("must not be empty")
	}
	t, err := parseTemplate(s, 0)
	if err != nil {
		return dnsTemplate{}, err
	}
	// A wildcard only as the whole first label of the configured text; a
	// value can never produce one.
	if err := t.checkLiterals(0, isDNSLiteralChar); err != nil {
		return dnsTemplate{}, err
	}
	if err := t.onePlaceholderPer('.', "DNS label"); err != nil {
		return dnsTemplate{}, err
	}
	if i := strings.IndexByte(s, '*'); i >= 0 && (i != 0 || !strings.HasPrefix(s, "*.")) {
		return dnsTemplate{}, fmt.Errorf("wildcard '*' only allowed as the whole first label, at offset %d", i)
	}
	if strings.IndexByte(s[1:], '*') >= 0 {
		return dnsTemplate{}, fmt.Errorf("only one wildcard allowed")
	}
	sample := t.sample()
	if err := checkDNSName(sample); err != nil {
		return dnsTemplate{}, fmt.Errorf("invalid DNS name %q: %w", sample, err)
	}
	dt := dnsTemplate{name: t}
	if t.placeholders == 0 {
		dt.static = s
	}
	return dt, nil
}

func (dt *dnsTemplate) render(attrs attestor.Attributes) (string, renderFailure) {
	if dt.static != "" {
		return dt.static, renderFailure{}
	}
	var arr [128]byte
	buf, f := dt.name.appendRendered(arr[:0], attrs, isDNSValue)
	if f.reason != "" {
		return "", f
	}
	name := string(buf)
	if err := checkDNSName(name); err != nil {
		return "", renderFailure{value: name, reason: reasonInvalidName}
	}
	return name, renderFailure{}
}

func isDNSLiteralChar(c byte) bool {
	return isDNSLabelChar(c) || c == '.' || c == '*'
}

func isDNSLabelChar(c byte) bool {
	return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-'
}

// isDNSValue accepts a value that stays within one DNS label: no dots, so a
// value cannot claim a name under another configured suffix, and no upper
// case, which would otherwise be a second spelling of the same name.
func isDNSValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if !isDNSLabelChar(v[i]) {
			return false
		}
	}
	return true
}

// checkDNSName accepts a lower-case RFC 1123 name, optionally "*." first.
func checkDNSName(name string) error {
	rest := strings.TrimPrefix(name, "*.")
	if len(name) > maxDNSNameLen {
		return fmt.Errorf("longer than %d bytes", maxDNSNameLen)
	}
	for label := range strings.SplitSeq(rest, ".") {
		switch {
		case label == "":
			return errors.New("empty label")
		case len(label) > maxLabelLen:
			return fmt.Errorf("label longer than %d bytes", maxLabelLen)
		case label[0] == '-' || label[len(label)-1] == '-':
			return errors.New("label starts or ends with '-'")
		}
		for i := 0; i < len(label); i++ {
			if !isDNSLabelChar(label[i]) {
				return fmt.Errorf("invalid character %q", label[i])
			}
		}
	}
	return nil
}
