package config

import (
	"errors"
	"flag"
	"fmt"
	"github.com/csi-agent/csi-agent/attestor/field"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/csi-agent/csi-agent/internal/rules"
)

// FromArgs builds the configuration of `csi-agent run`: defaults, then the
// --config file, then --dev adjustments, then every flag given, then
// environment fallbacks. The result is validated.
func FromArgs(args []string, getenv func(string) string, usage io.Writer, extra ...func(*flag.FlagSet)) (Config, error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(usage)
	for _, add := range extra {
		add(fs)
	}
	var (
		configPath = fs.String("config", "", "YAML config file; flags override it")
		dev        = fs.Bool("dev", false, "try it locally: temp dirs, CSI off, an SVID for the current user")
	)
	// Each flag records a parsed override, applied after the file.
	f := flagSet{fs: fs, overrides: map[string]func(*Config){}}
	overrides := f.overrides
	str := func(name, u string, set func(*Config, string)) { define(f, name, u, parseString, set) }
	num := func(name, u string, set func(*Config, int)) { define(f, name, u, parseInt, set) }
	dur := func(name, u string, set func(*Config, Duration)) { define(f, name, u, parseDuration, set) }
	boolean := func(name, u string, set func(*Config, bool)) { define(f, name, u, parseBool, set) }

	str("trust-domain", "trust domain (default "+DefaultTrustDomain+")", func(c *Config, v string) { c.TrustDomain = v })
	str("state-dir", "state directory: CA material and CSI records (default "+DefaultStateDir+")", func(c *Config, v string) { c.StateDir = v })
	str("proc-root", "host procfs as seen in the agent's PID namespace; security-sensitive (default $HOST_PROC or /proc)", func(c *Config, v string) { c.ProcRoot = v })
	str("node-name", "this node's name (default $"+DefaultNodeNameEnv+")", func(c *Config, v string) { c.NodeName = v })
	str("workload-api-socket-dir", "directory of the Workload API socket; bind-mounted into pods (default "+DefaultSocketDir+")", func(c *Config, v string) { c.WorkloadAPI.SocketDir = v })
	str("workload-api-socket-name", "Workload API socket file name (default "+DefaultSocketName+")", func(c *Config, v string) { c.WorkloadAPI.SocketName = v })
	str("workload-api-socket-aliases", "more names of the Workload API socket, comma-separated (symbolic links in its directory)", func(c *Config, v string) {
		c.WorkloadAPI.SocketAliases = strings.FieldsFunc(v, func(r rune) bool { return r == ',' })
	})
	str("csi-socket", "CSI endpoint socket; empty turns the CSI node plugin off", func(c *Config, v string) { c.CSI.Socket = v })
	str("driver-name", "CSI driver name (default "+DefaultDriverName+")", func(c *Config, v string) { c.CSI.DriverName = v })
	str("kubelet-root-dir", "kubelet root directory (default "+DefaultKubeletRootDir+")", func(c *Config, v string) { c.CSI.KubeletRootDir = v })
	str("cross-check", "pod vs CSI mount record check: enforce, warn or off (default enforce)", func(c *Config, v string) { c.Kubernetes.CrossCheck = v })
	str("kubelet-host", "kubelet host (default "+DefaultKubeletHost+"; the serving certificate is checked against the node name)", func(c *Config, v string) { c.Kubernetes.Kubelet.Host = v })
	num("kubelet-port", "kubelet secure port (default 10250)", func(c *Config, v int) { c.Kubernetes.Kubelet.Port = v })
	num("kubelet-read-only-port", "kubelet read-only port; non-zero uses plain HTTP instead of the secure port", func(c *Config, v int) { c.Kubernetes.Kubelet.ReadOnlyPort = v })
	str("kubelet-token-file", "bearer token for the kubelet (default the service account token)", func(c *Config, v string) { c.Kubernetes.Kubelet.TokenFile = v })
	str("kubelet-ca-file", "CA bundle that verifies the kubelet's serving certificate (default the service account's ca.crt; a self-signed kubelet: its pki/kubelet.crt)", func(c *Config, v string) { c.Kubernetes.Kubelet.CAFile = v })
	str("kubelet-client-cert", "client certificate for the kubelet", func(c *Config, v string) { c.Kubernetes.Kubelet.ClientCertFile = v })
	str("kubelet-client-key", "client key for the kubelet", func(c *Config, v string) { c.Kubernetes.Kubelet.ClientKeyFile = v })
	boolean("kubelet-insecure-skip-verify", "do not verify the kubelet's serving certificate", func(c *Config, v bool) { c.Kubernetes.Kubelet.InsecureSkipVerify = v })
	boolean("kubelet-send-token-unverified", "with --kubelet-insecure-skip-verify: send the token all the same", func(c *Config, v bool) { c.Kubernetes.Kubelet.SendTokenUnverified = v })
	boolean("kubernetes", "Kubernetes workload attestation (default: on when CSI is on)", func(c *Config, v bool) { c.Kubernetes.Enabled = &v })
	str("ca-mode", "CA mode: selfManaged, upstream or cluster (default: upstream when --upstream-ca-cert is set, else selfManaged)", func(c *Config, v string) { c.CA.Mode = v })
	str("upstream-ca-cert", "upstream CA certificate (PEM); with --upstream-ca-key, agents share one trust anchor", func(c *Config, v string) { c.CA.UpstreamCertFile = v })
	str("upstream-ca-key", "upstream CA private key (PEM)", func(c *Config, v string) { c.CA.UpstreamKeyFile = v })
	dur("x509-svid-ttl", "X.509-SVID lifetime (default 1h)", func(c *Config, v Duration) { c.CA.X509SVIDTTL = v })
	dur("jwt-svid-ttl", "JWT-SVID lifetime (default 5m)", func(c *Config, v Duration) { c.CA.JWTSVIDTTL = v })
	str("metrics-addr", "host:port of /metrics, /livez and /readyz (HTTP); empty (default) turns them off", func(c *Config, v string) { c.Metrics.Addr = v })
	str("logging-format", "log format: text or json (default text)", func(c *Config, v string) { c.Logging.Format = v })

	cfg, err := parseAndLoad(fs, args, configPath)
	if err != nil {
		return cfg, err
	}
	var devDir string
	if *dev {
		devDir = DevDir(getenv)
		applyDev(&cfg, devDir)
	}
	fs.Visit(func(f *flag.Flag) {
		if apply, ok := overrides[f.Name]; ok {
			apply(&cfg)
		}
	})
	if _, set := overrides["node-name"]; !set && cfg.NodeName == "" {
		cfg.NodeName = getenv(DefaultNodeNameEnv)
	}
	if _, set := overrides["proc-root"]; !set && cfg.ProcRoot == DefaultProcRoot {
		if p := getenv("HOST_PROC"); p != "" {
			cfg.ProcRoot = p
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	if devDir != "" && (within(cfg.StateDir, devDir) || within(cfg.WorkloadAPI.SocketDir, devDir)) {
		if err := ensurePrivateDir(devDir); err != nil {
			return cfg, fmt.Errorf("--dev: %w", err)
		}
	}
	return cfg, nil
}

func within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// applyDev points the agent at per-user temp dirs, turns CSI and Kubernetes
// off, and, with no svids configured, issues the current user an identity.
func applyDev(c *Config, base string) {
	c.Dev = true
	if c.StateDir == DefaultStateDir {
		c.StateDir = filepath.Join(base, "state")
	}
	if c.WorkloadAPI.SocketDir == DefaultSocketDir {
		c.WorkloadAPI.SocketDir = filepath.Join(base, "sockets")
	}
	c.CSI.Socket = ""
	off := false
	c.Kubernetes.Enabled = &off
	if len(c.SVIDs) == 0 {
		uid := strconv.Itoa(os.Getuid())
		c.SVIDs = []rules.SVID{{
			SPIFFEID: "/unix/uid/{" + field.UnixUID + "}",
			Rules:    []rules.Rule{{Match: map[string]string{field.UnixUID: uid}}},
		}}
	}
}

// DevDir is the per-user directory of `run --dev`: under $XDG_RUNTIME_DIR,
// else the user's cache dir, else the temp dir with the uid in the name.
// Only ensurePrivateDir makes it safe to use: in a shared temp dir another
// user may have made it first.
func DevDir(getenv func(string) string) string {
	switch {
	case getenv("XDG_RUNTIME_DIR") != "":
		return filepath.Join(getenv("XDG_RUNTIME_DIR"), "csi-agent-dev")
	case getenv("XDG_CACHE_HOME") != "":
		return filepath.Join(getenv("XDG_CACHE_HOME"), "csi-agent-dev")
	case getenv("HOME") != "":
		return filepath.Join(getenv("HOME"), ".cache", "csi-agent-dev")
	}
	tmp := getenv("TMPDIR")
	if tmp == "" {
		tmp = "/tmp"
	}
	return filepath.Join(tmp, fmt.Sprintf("csi-agent-dev-%d", os.Geteuid()))
}

// DevSocketPath is where `run --dev` serves the Workload API by default.
func DevSocketPath(getenv func(string) string) string {
	return filepath.Join(DevDir(getenv), "sockets", DefaultSocketName)
}

// ensurePrivateDir creates dir 0700, or accepts an existing one only if it
// is a real directory (no symlink) owned by us and closed to others. Anyone
// else's directory there could hold a CA key we would load or a socket they
// could swap.
func ensurePrivateDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(dir), err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory (a symlink?); refusing to use it", dir)
	case !ok || int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is owned by uid %d, not by us (uid %d); refusing to use it: remove it or pick --state-dir and --workload-api-socket-dir", dir, st.Uid, os.Geteuid())
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%s has mode %o, open to other users; refusing to use it (chmod 700 it)", dir, fi.Mode().Perm())
	}
	return nil
}

type flagSet struct {
	fs        *flag.FlagSet
	overrides map[string]func(*Config)
}

// define adds a flag whose value, once parsed, is kept as an override of
// the config; the last of a repeated flag wins.
func define[T any](f flagSet, name, usage string, parse func(string) (T, error), set func(*Config, T)) {
	fn := func(v string) error {
		x, err := parse(v)
		if err != nil {
			return err
		}
		f.overrides[name] = func(c *Config) { set(c, x) }
		return nil
	}
	if _, isBool := any(*new(T)).(bool); isBool {
		f.fs.BoolFunc(name, usage, fn)
		return
	}
	f.fs.Func(name, usage, fn)
}

func parseString(v string) (string, error) { return v, nil }

func parseInt(v string) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("not a number: %q", v)
	}
	return n, nil
}

func parseDuration(v string) (Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("not a duration: %q", v)
	}
	return Duration(d), nil
}

func parseBool(v string) (bool, error) {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("not a boolean: %q", v)
	}
	return b, nil
}

// parseAndLoad parses args into fs and loads the --config file they name;
// without one, the defaults.
func parseAndLoad(fs *flag.FlagSet, args []string, configPath *string) (Config, error) {
	if err := fs.Parse(args); err != nil {
		return Default(), err
	}
	if fs.NArg() > 0 {
		return Default(), fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *configPath == "" {
		return Default(), nil
	}
	return Load(*configPath)
}
