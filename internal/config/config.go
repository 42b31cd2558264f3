// Package config reads the agent's configuration: a YAML file, then flags on
// top. Parsing is strict: an unknown or invalid field refuses to start and
// the error names the field.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/internal/fsutil"
	"net"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Defaults.
const (
	DefaultTrustDomain    = "cluster.local"
	DefaultStateDir       = "/var/lib/csi-agent"
	DefaultProcRoot       = "/proc"
	DefaultSocketDir      = "/run/csi-agent/sockets"
	DefaultSocketName     = "agent.sock"
	DefaultDriverName     = "csi-agent.spiffe.io"
	DefaultKubeletRootDir = "/var/lib/kubelet"
	DefaultKubeletPort    = 10250
	DefaultX509SVIDTTL    = time.Hour
	DefaultJWTSVIDTTL     = 5 * time.Minute
	DefaultNodeNameEnv    = "MY_NODE_NAME"
	DefaultTokenFile      = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	// DefaultKubeletCAFile is the cluster CA as mounted into every pod: it
	// verifies kubelets whose serving certificates the cluster signs
	// (serverTLSBootstrap). Self-signed kubelets need caFile set (README).
	DefaultKubeletCAFile = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

	MaxX509SVIDTTL = DefaultIntermediateTTL / 2
	MaxJWTSVIDTTL  = 24 * time.Hour
)

// Config is the whole agent configuration.
type Config struct {
	TrustDomain string              `json:"trustDomain"`
	StateDir    string              `json:"stateDir"`
	ProcRoot    string              `json:"procRoot"`
	NodeName    string              `json:"nodeName"`
	WorkloadAPI WorkloadAPI         `json:"workloadAPI"`
	CSI         CSI                 `json:"csi"`
	Kubernetes  Kubernetes          `json:"kubernetes"`
	CA          CA                  `json:"ca"`
	Unix        Unix                `json:"unix"`
	Federation  []federation.Source `json:"federation"`
	// FederationRefresh and BundleEndpoint: federation.go.
	FederationRefresh FederationRefresh `json:"federationRefresh"`
	BundleEndpoint    BundleEndpoint    `json:"bundleEndpoint"`
	SVIDs             []rules.SVID      `json:"svids"`
	Metrics           Metrics           `json:"metrics"`
	Logging           Logging           `json:"logging"`
	Controller        Controller        `json:"controller"`

	// Dev is set by --dev only: temp dirs, CSI off, a rule for the current user.
	Dev bool `json:"-"`
}

// WorkloadAPI configures the Workload API endpoint.
type WorkloadAPI struct {
	SocketDir  string `json:"socketDir"`
	SocketName string `json:"socketName"`
	// SocketAliases are more names of the socket in SocketDir (symbolic
	// links to SocketName), as SPIRE's chart offers: socket, api.sock.
	SocketAliases []string `json:"socketAliases"`
	Limits        Limits   `json:"limits"`
}

// Limits bound what callers of the Workload API socket can make the agent
// hold: every pod on the node shares it, so no caller may take all of it.
type Limits struct {
	// MaxConnections bounds open connections (also by the file descriptor
	// limit, less a reserve for the CSI socket and files).
	MaxConnections int `json:"maxConnections"`
	// MaxUnattestedConnections bounds connections not yet served an
	// identity; the rest of MaxConnections is kept for entitled callers.
	MaxUnattestedConnections int `json:"maxUnattestedConnections"`
	// MaxConnectionsPerCaller bounds one caller's (uid's) connections.
	MaxConnectionsPerCaller int `json:"maxConnectionsPerCaller"`
	// MaxStreams bounds open streams in all; MaxStreamsPerCaller one
	// caller's; MaxStreamsPerConnection one connection's.
	MaxStreams              int `json:"maxStreams"`
	MaxStreamsPerCaller     int `json:"maxStreamsPerCaller"`
	MaxStreamsPerConnection int `json:"maxStreamsPerConnection"`
	// DeniedCallsPerSecond and DeniedCallBurst bound one caller's denied
	// calls; past them its calls are refused before any attestation work.
	DeniedCallsPerSecond int `json:"deniedCallsPerSecond"`
	DeniedCallBurst      int `json:"deniedCallBurst"`
	// IdleTimeout closes a connection with no open stream.
	IdleTimeout Duration `json:"idleTimeout"`
	// HandshakeTimeout bounds a new connection's setup (HTTP/2 preface).
	HandshakeTimeout Duration `json:"handshakeTimeout"`
	// MaxRequestBytes bounds one request message.
	MaxRequestBytes int `json:"maxRequestBytes"`
	// MaxAudiences and MaxAudienceBytes bound a FetchJWTSVID audience.
	MaxAudiences     int `json:"maxAudiences"`
	MaxAudienceBytes int `json:"maxAudienceBytes"`
}

// SocketPath is the Workload API socket's path.
func (w WorkloadAPI) SocketPath() string { return filepath.Join(w.SocketDir, w.SocketName) }

// CSI configures the CSI node plugin; it is off while Socket is empty.
type CSI struct {
	Socket         string `json:"socket"`
	DriverName     string `json:"driverName"`
	KubeletRootDir string `json:"kubeletRootDir"`
	// Registration turns the built-in kubelet plugin registration on (default on).
	Registration *bool `json:"registration"`
}

// Kubernetes configures Kubernetes workload attestation.
type Kubernetes struct {
	// Enabled defaults to true when CSI is on.
	Enabled    *bool   `json:"enabled"`
	CrossCheck string  `json:"crossCheck"`
	Kubelet    Kubelet `json:"kubelet"`
	// RetryBudget bounds how long a caller whose pod is not yet listed waits.
	RetryBudget Duration `json:"retryBudget"`
}

// Kubelet configures the kubelet client.
type Kubelet struct {
	Host               string `json:"host"`
	Port               int    `json:"port"`
	ReadOnlyPort       int    `json:"readOnlyPort"`
	TokenFile          string `json:"tokenFile"`
	CAFile             string `json:"caFile"`
	ClientCertFile     string `json:"clientCertFile"`
	ClientKeyFile      string `json:"clientKeyFile"`
	InsecureSkipVerify bool   `json:"insecureSkipVerify"`
	// SendTokenUnverified is the second, explicit opt-in that lets the token
	// go to a kubelet that insecureSkipVerify leaves unverified.
	SendTokenUnverified bool `json:"sendTokenUnverified"`
	Anonymous           bool `json:"anonymous"`
}

// Metrics configures the HTTP listener of /metrics, /livez and /readyz.
type Metrics struct {
	// Addr is host:port to listen on; empty (the default) turns it off.
	Addr string `json:"addr"`
}

// Logging configures the log output.
type Logging struct {
	// Format is "text" (klog's, the default) or "json" (component-base's).
	Format string `json:"format"`
}

// Log formats.
const (
	LogFormatText = "text"
	LogFormatJSON = "json"
)

// CA configures the issuing authority.
type CA struct {
	// Mode is selfManaged, upstream or cluster; empty: upstream when the
	// upstream files are set, else selfManaged (cluster.go).
	Mode             string   `json:"mode"`
	UpstreamCertFile string   `json:"upstreamCertFile"`
	UpstreamKeyFile  string   `json:"upstreamKeyFile"`
	X509SVIDTTL      Duration `json:"x509SVIDTTL"`
	JWTSVIDTTL       Duration `json:"jwtSVIDTTL"`
	// JWTIssuer, when set, is the iss claim of JWT-SVIDs.
	JWTIssuer string    `json:"jwtIssuer"`
	Cluster   ClusterCA `json:"cluster"`
}

// Unix configures Unix attestation.
type Unix struct {
	WorkloadPath   bool  `json:"workloadPath"`
	WorkloadSHA256 bool  `json:"workloadSHA256"`
	MaxBinarySize  int64 `json:"maxBinarySize"`
	// PasswdFile and GroupFile resolve user and group names; in a container
	// point them at the host's files (e.g. /host/etc/passwd).
	PasswdFile string `json:"passwdFile"`
	GroupFile  string `json:"groupFile"`
}

// Duration is a time.Duration written as "90s", "1h".
type Duration time.Duration

// UnmarshalJSON accepts a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration such as \"1h\" or \"90s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// KubernetesEnabled reports whether Kubernetes attestation is on.
func (c *Config) KubernetesEnabled() bool {
	if c.Kubernetes.Enabled != nil {
		return *c.Kubernetes.Enabled
	}
	return c.CSI.Socket != ""
}

// RegistrationEnabled reports whether kubelet plugin registration is on.
func (c *Config) RegistrationEnabled() bool {
	return c.CSI.Registration == nil || *c.CSI.Registration
}

// Default returns the configuration with every default filled in.
func Default() Config {
	return Config{
		TrustDomain: DefaultTrustDomain,
		StateDir:    DefaultStateDir,
		ProcRoot:    DefaultProcRoot,
		WorkloadAPI: WorkloadAPI{SocketDir: DefaultSocketDir, SocketName: DefaultSocketName, Limits: DefaultLimits()},
		CSI:         CSI{DriverName: DefaultDriverName, KubeletRootDir: DefaultKubeletRootDir},
		Kubernetes: Kubernetes{
			CrossCheck:  "enforce",
			Kubelet:     Kubelet{Port: DefaultKubeletPort, TokenFile: DefaultTokenFile, CAFile: DefaultKubeletCAFile},
			RetryBudget: Duration(DefaultRetryBudget),
		},
		CA:      CA{X509SVIDTTL: Duration(DefaultX509SVIDTTL), JWTSVIDTTL: Duration(DefaultJWTSVIDTTL), Cluster: DefaultClusterCA()},
		Unix:    Unix{MaxBinarySize: DefaultMaxBinarySize, PasswdFile: DefaultPasswdFile, GroupFile: DefaultGroupFile},
		Logging: Logging{Format: LogFormatText},
	}
}

// DefaultLimits are sized for the DaemonSet's 256 MiB memory limit with
// room to spare (BENCHMARKS.md measures the cost of a connection and a
// stream), and far above what a node's pods use.
func DefaultLimits() Limits {
	return Limits{
		MaxConnections:           4096,
		MaxUnattestedConnections: 1024,
		MaxConnectionsPerCaller:  512,
		MaxStreams:               8192,
		MaxStreamsPerCaller:      1024,
		MaxStreamsPerConnection:  16,
		DeniedCallsPerSecond:     10,
		DeniedCallBurst:          20,
		IdleTimeout:              Duration(5 * time.Minute),
		HandshakeTimeout:         Duration(5 * time.Second),
		MaxRequestBytes:          64 << 10,
		MaxAudiences:             32,
		MaxAudienceBytes:         1024,
	}
}

// Parse reads YAML onto the defaults. Unknown fields and wrong types are
// errors naming the field's path (e.g. "csi.driverNme: unknown field").
func Parse(data []byte) (Config, error) {
	cfg := Default()
	// Strict: a key written twice is a mistake to report, not a value to
	// guess (the plain decoder keeps the last one).
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return cfg, fmt.Errorf("config is not valid YAML: %w", err)
	}
	if t := strings.TrimSpace(string(js)); t == "null" || t == "" {
		// An empty read is what a file being rewritten in place looks like;
		// taking it for "all defaults" would widen access on a reload.
		return cfg, ErrEmpty
	}
	if err := checkFields(js, reflect.TypeOf(cfg)); err != nil {
		return cfg, err
	}
	dec := json.NewDecoder(strings.NewReader(string(js)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return cfg, describeDecodeError(err)
	}
	return cfg, nil
}

// ErrEmpty is a config with no settings at all.
var ErrEmpty = errors.New("config is empty (a file being rewritten reads so): give at least one setting, or no --config")

// Load reads and parses a config file. A file that changes while it is read
// (rewritten in place rather than replaced by a rename) is read again until
// two reads agree, so a torn read is never taken for the whole file.
func Load(path string) (Config, error) {
	data, err := readStable(path)
	if err != nil {
		return Default(), fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// maxConfigSize bounds a config file; real ones are a few KiB.
const maxConfigSize = 4 << 20

// readStable reads path until two reads a moment apart agree.
func readStable(path string) ([]byte, error) {
	const (
		attempts = 20
		settle   = 20 * time.Millisecond
	)
	prev, err := fsutil.ReadFileLimited(path, maxConfigSize)
	if err != nil {
		return nil, err
	}
	for range attempts {
		time.Sleep(settle)
		cur, err := fsutil.ReadFileLimited(path, maxConfigSize)
		if err != nil {
			return nil, err
		}
		if bytes.Equal(prev, cur) {
			return cur, nil
		}
		prev = cur
	}
	return nil, fmt.Errorf("%s kept changing while it was read; not applied", path)
}

func describeDecodeError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			field = "(top level)"
		}
		if te.Value == "bool" && te.Type.Kind() == reflect.String {
			return fmt.Errorf("%s: want a string, got a boolean (YAML reads a bare on/off/yes/no/y/n as one: quote the value)", field)
		}
		return fmt.Errorf("%s: want %s, got %s", field, te.Type, te.Value)
	}
	return err
}

// checkFields walks the JSON document against the Go type and reports the
// first unknown key with its full path, which encoding/json does not give.
func checkFields(js []byte, t reflect.Type) error {
	var doc any
	if err := json.Unmarshal(js, &doc); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if doc == nil {
		return nil
	}
	return walk(doc, t, "")
}

func walk(v any, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == reflect.TypeOf(Duration(0)) {
		// Custom unmarshalers' errors carry no field name; check here.
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("%s: want a duration such as \"1h\" or \"90s\"", path)
		}
		if _, err := time.ParseDuration(s); err != nil {
			return fmt.Errorf("%s: invalid duration %q", path, s)
		}
		return nil
	}
	switch val := v.(type) {
	case map[string]any:
		switch t.Kind() {
		case reflect.Struct:
			fields := jsonFields(t)
			keys := make([]string, 0, len(val))
			for k := range val {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				ft, ok := fields[k]
				if !ok {
					return fmt.Errorf("%s: unknown field", join(path, k))
				}
				if err := walk(val[k], ft, join(path, k)); err != nil {
					return err
				}
			}
		case reflect.Map:
			for k, e := range val {
				if err := walk(e, t.Elem(), join(path, k)); err != nil {
					return err
				}
			}
		}
	case []any:
		if t.Kind() == reflect.Slice {
			for i, e := range val {
				if err := walk(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

// Validate checks every field the agent (`csi-agent run`) reads and returns
// the first problem, naming it. Rules and federation sources are compiled by
// their own packages, which name their fields. The controller section is
// the controller's (ValidateController): the file is shared, and a mistake
// there must not stop the agents on every node.
func (c *Config) Validate() error {
	if err := c.validateCommon(); err != nil {
		return err
	}
	return c.validateAgent()
}

// validateCommon checks what both commands read.
func (c *Config) validateCommon() error {
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		return fmt.Errorf("trustDomain: %q is not a valid trust domain: %w", c.TrustDomain, err)
	}
	if strings.ContainsAny(c.TrustDomain, ":/") {
		return fmt.Errorf("trustDomain: give the bare name (example.org), not %q", c.TrustDomain)
	}
	if f := c.Logging.Format; f != LogFormatText && f != LogFormatJSON {
		return fmt.Errorf("logging.format: must be %s or %s, got %q", LogFormatText, LogFormatJSON, f)
	}
	if a := c.Metrics.Addr; a != "" {
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			return fmt.Errorf("metrics.addr: must be host:port (such as 0.0.0.0:9808 or 127.0.0.1:9808), got %q", a)
		}
	}
	return nil
}

func (c *Config) validateAgent() error {
	checks := []struct {
		field, value string
	}{
		{"stateDir", c.StateDir},
		{"procRoot", c.ProcRoot},
		{"workloadAPI.socketDir", c.WorkloadAPI.SocketDir},
	}
	for _, ch := range checks {
		if ch.value == "" {
			return fmt.Errorf("%s: must not be empty", ch.field)
		}
		if !filepath.IsAbs(ch.value) {
			return fmt.Errorf("%s: must be an absolute path, got %q", ch.field, ch.value)
		}
	}
	name := c.WorkloadAPI.SocketName
	if name == "" || strings.ContainsRune(name, '/') || name == "." || name == ".." {
		return fmt.Errorf("workloadAPI.socketName: must be a plain file name, got %q", name)
	}
	if err := c.WorkloadAPI.validateAliases(); err != nil {
		return err
	}
	if err := c.WorkloadAPI.Limits.validate(); err != nil {
		return err
	}
	// sun_path holds 108 bytes including the terminating NUL.
	if n := len(c.WorkloadAPI.SocketPath()); n > 107 {
		return fmt.Errorf("workloadAPI.socketDir: socket path is %d bytes, Unix sockets allow 107", n)
	}
	if c.CSI.Socket != "" {
		if !filepath.IsAbs(c.CSI.Socket) {
			return fmt.Errorf("csi.socket: must be an absolute path, got %q", c.CSI.Socket)
		}
		if len(c.CSI.Socket) > 107 {
			return fmt.Errorf("csi.socket: path is %d bytes, Unix sockets allow 107", len(c.CSI.Socket))
		}
		if !validDriverName(c.CSI.DriverName) {
			return fmt.Errorf("csi.driverName: %q is not a valid CSI driver name (DNS-1123 style, at most 63 characters, e.g. csi-agent.spiffe.io)", c.CSI.DriverName)
		}
		if !filepath.IsAbs(c.CSI.KubeletRootDir) {
			return fmt.Errorf("csi.kubeletRootDir: must be an absolute path, got %q", c.CSI.KubeletRootDir)
		}
		if c.NodeName == "" {
			return fmt.Errorf("nodeName: required when CSI is on (set --node-name or $%s)", DefaultNodeNameEnv)
		}
	}
	switch c.Kubernetes.CrossCheck {
	case "enforce", "warn", "off":
	default:
		return fmt.Errorf("kubernetes.crossCheck: %q is not one of enforce, warn, off", c.Kubernetes.CrossCheck)
	}
	if c.KubernetesEnabled() {
		k := c.Kubernetes.Kubelet
		if err := checkPort("kubernetes.kubelet.port", k.Port, false); err != nil {
			return err
		}
		if err := checkPort("kubernetes.kubelet.readOnlyPort", k.ReadOnlyPort, true); err != nil {
			return err
		}
		if (k.ClientCertFile == "") != (k.ClientKeyFile == "") {
			return errors.New("kubernetes.kubelet.clientCertFile: clientCertFile and clientKeyFile go together")
		}
		if k.ReadOnlyPort == 0 && !k.InsecureSkipVerify && k.Host == "" && c.NodeName == "" {
			return fmt.Errorf("nodeName: required to verify the kubelet's serving certificate (set --node-name or $%s, or kubernetes.kubelet.host)", DefaultNodeNameEnv)
		}
		if k.InsecureSkipVerify && k.CAFile != "" && k.CAFile != DefaultKubeletCAFile {
			return errors.New("kubernetes.kubelet.insecureSkipVerify: cannot be combined with caFile")
		}
		if k.SendTokenUnverified && (!k.InsecureSkipVerify || k.ReadOnlyPort > 0) {
			return errors.New("kubernetes.kubelet.sendTokenUnverified: only applies with insecureSkipVerify on the secure port")
		}
		if k.InsecureSkipVerify && k.ReadOnlyPort == 0 && k.tokenFile() != "" && !k.SendTokenUnverified {
			return errors.New("kubernetes.kubelet.insecureSkipVerify: the token would go to whatever listens on the kubelet's port; " +
				"verify the kubelet instead (caFile: the cluster CA for serverTLSBootstrap kubelets, or the kubelet's own " +
				"/var/lib/kubelet/pki/kubelet.crt), use a client certificate, or also set sendTokenUnverified: true")
		}
		if k.ReadOnlyPort == 0 && !k.Anonymous && k.TokenFile == "" && k.ClientCertFile == "" {
			return errors.New("kubernetes.kubelet.tokenFile: the secure port needs a token file, a client certificate or anonymous: true")
		}
		if k.Anonymous && k.TokenFile != "" && k.TokenFile != DefaultTokenFile {
			return errors.New("kubernetes.kubelet.anonymous: cannot be combined with tokenFile")
		}
		if c.CSI.Socket == "" && c.Kubernetes.CrossCheck == "enforce" {
			return errors.New("kubernetes.crossCheck: enforce needs the CSI plugin (csi.socket) for mount records; set warn or off")
		}
		if c.Kubernetes.RetryBudget <= 0 {
			return fmt.Errorf("kubernetes.retryBudget: must be positive, got %s", time.Duration(c.Kubernetes.RetryBudget))
		}
	}
	if (c.CA.UpstreamCertFile == "") != (c.CA.UpstreamKeyFile == "") {
		return errors.New("ca.upstreamCertFile: upstreamCertFile and upstreamKeyFile go together")
	}
	if err := c.validateCA(); err != nil {
		return err
	}
	if err := c.validateFederation(); err != nil {
		return err
	}
	for _, ttl := range []struct {
		field    string
		d, limit time.Duration
	}{
		// X.509-SVIDs must fit the intermediate's remaining life at its
		// rotation (half life); JWT-SVIDs cannot be revoked, keep them short.
		{"ca.x509SVIDTTL", time.Duration(c.CA.X509SVIDTTL), MaxX509SVIDTTL},
		{"ca.jwtSVIDTTL", time.Duration(c.CA.JWTSVIDTTL), MaxJWTSVIDTTL},
	} {
		if ttl.d < 10*time.Second {
			return fmt.Errorf("%s: must be at least 10s, got %s", ttl.field, ttl.d)
		}
		if ttl.d > ttl.limit {
			return fmt.Errorf("%s: must be at most %s, got %s", ttl.field, ttl.limit, ttl.d)
		}
	}
	if c.Unix.MaxBinarySize <= 0 {
		return fmt.Errorf("unix.maxBinarySize: must be positive, got %d", c.Unix.MaxBinarySize)
	}
	if c.Unix.PasswdFile == "" {
		return errors.New("unix.passwdFile: must not be empty")
	}
	if c.Unix.GroupFile == "" {
		return errors.New("unix.groupFile: must not be empty")
	}
	return nil
}

func checkPort(field string, p int, zeroOK bool) error {
	if zeroOK && p == 0 {
		return nil
	}
	if p < 1 || p > 65535 {
		return fmt.Errorf("%s: %d is not a TCP port", field, p)
	}
	return nil
}

func validDriverName(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case r == '-' || r == '.':
			if i == 0 || i == len(s)-1 {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func (l Limits) validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{
		{"maxConnections", l.MaxConnections},
		{"maxUnattestedConnections", l.MaxUnattestedConnections},
		{"maxConnectionsPerCaller", l.MaxConnectionsPerCaller},
		{"maxStreams", l.MaxStreams},
		{"maxStreamsPerCaller", l.MaxStreamsPerCaller},
		{"maxStreamsPerConnection", l.MaxStreamsPerConnection},
		{"deniedCallsPerSecond", l.DeniedCallsPerSecond},
		{"deniedCallBurst", l.DeniedCallBurst},
		{"maxAudiences", l.MaxAudiences},
		{"maxAudienceBytes", l.MaxAudienceBytes},
	} {
		// Every limit is on: a resource without one is one a caller can take.
		if f.v <= 0 {
			return fmt.Errorf("workloadAPI.limits.%s: must be positive, got %d", f.name, f.v)
		}
	}
	switch {
	case l.MaxUnattestedConnections > l.MaxConnections:
		return fmt.Errorf("workloadAPI.limits.maxUnattestedConnections: %d exceeds maxConnections %d: nothing would be kept for entitled callers", l.MaxUnattestedConnections, l.MaxConnections)
	case l.MaxRequestBytes < 4<<10:
		return fmt.Errorf("workloadAPI.limits.maxRequestBytes: must be at least 4096, got %d", l.MaxRequestBytes)
	case l.IdleTimeout < Duration(time.Second):
		return fmt.Errorf("workloadAPI.limits.idleTimeout: must be at least 1s, got %s", time.Duration(l.IdleTimeout))
	case l.HandshakeTimeout < Duration(100*time.Millisecond):
		return fmt.Errorf("workloadAPI.limits.handshakeTimeout: must be at least 100ms, got %s", time.Duration(l.HandshakeTimeout))
	}
	return nil
}

// validateAliases: each alias a plain file name, other than the socket's
// and the others, whose path fits a Unix socket address.
func (w WorkloadAPI) validateAliases() error {
	seen := map[string]bool{w.SocketName: true}
	for i, a := range w.SocketAliases {
		field := fmt.Sprintf("workloadAPI.socketAliases[%d]", i)
		switch {
		case a == "" || strings.ContainsRune(a, '/') || a == "." || a == ".." || strings.HasPrefix(a, "."):
			return fmt.Errorf("%s: must be a plain file name not starting with a dot, got %q", field, a)
		case seen[a]:
			return fmt.Errorf("%s: %q is the socket's name or another alias", field, a)
		case len(filepath.Join(w.SocketDir, a)) > 107:
			return fmt.Errorf("%s: path is %d bytes, Unix sockets allow 107", field, len(filepath.Join(w.SocketDir, a)))
		}
		seen[a] = true
	}
	return nil
}
