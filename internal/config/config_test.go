package config

import (
	"github.com/csi-agent/csi-agent/internal/testutil"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseValid(t *testing.T) {
	cfg, err := Parse([]byte(`
trustDomain: example.org
workloadAPI: {socketDir: /run/x, socketName: spire-agent.sock}
csi: {socket: /var/lib/kubelet/plugins/csi.spiffe.io/csi.sock, driverName: csi.spiffe.io}
nodeName: node-1
kubernetes: {crossCheck: warn, kubelet: {port: 10250, insecureSkipVerify: true, sendTokenUnverified: true}}
ca: {x509SVIDTTL: 30m, jwtSVIDTTL: 2m}
svids:
- spiffeID: /ns/{kubernetes.namespace}/sa/{kubernetes.service_account}
  rules: [{match: {kubernetes.namespace: prod}}, {selectors: ["k8s:pod-label:app:web"]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.TrustDomain != "example.org" || cfg.WorkloadAPI.SocketPath() != "/run/x/spire-agent.sock" {
		t.Errorf("got %+v", cfg)
	}
	if time.Duration(cfg.CA.X509SVIDTTL) != 30*time.Minute || time.Duration(cfg.CA.JWTSVIDTTL) != 2*time.Minute {
		t.Errorf("ttls %v %v", cfg.CA.X509SVIDTTL, cfg.CA.JWTSVIDTTL)
	}
	if !cfg.KubernetesEnabled() || cfg.Kubernetes.CrossCheck != "warn" {
		t.Errorf("kubernetes not as configured: %+v", cfg.Kubernetes)
	}
	if len(cfg.SVIDs) != 1 || len(cfg.SVIDs[0].Rules) != 2 {
		t.Errorf("svids: %+v", cfg.SVIDs)
	}
	// Unset fields keep their defaults.
	if cfg.StateDir != DefaultStateDir || cfg.CSI.KubeletRootDir != DefaultKubeletRootDir {
		t.Errorf("defaults lost: %+v", cfg)
	}
}

func TestMalformedConfigNamesField(t *testing.T) {
	cases := []struct {
		name, yaml, field string
	}{
		{"unknown top-level", "trustDomian: x.org", "trustDomian: unknown field"},
		{"unknown nested", "csi: {driverNme: x}", "csi.driverNme: unknown field"},
		{"unknown in list", "svids: [{spiffeID: /a, rules: [{match: {unix.uid: '1'}, extra: 1}]}]", "svids[0].rules[0].extra: unknown field"},
		{"wrong type", "kubernetes: {kubelet: {port: abc}}", "kubernetes.kubelet.port"},
		{"bad duration", "ca: {x509SVIDTTL: forever}", "x509SVIDTTL"},
		{"bad trust domain", "trustDomain: Example.ORG", "trustDomain"},
		{"trust domain as URI", "trustDomain: spiffe://example.org", "trustDomain"},
		{"relative state dir", "stateDir: state", "stateDir"},
		{"socket name with slash", "workloadAPI: {socketName: a/b.sock}", "workloadAPI.socketName"},
		{"socket path too long", "workloadAPI: {socketDir: /" + strings.Repeat("d", 120) + "}", "workloadAPI.socketDir"},
		{"cross check", "kubernetes: {crossCheck: maybe}", "kubernetes.crossCheck"},
		{"driver name", "nodeName: node1\ncsi: {socket: /p/csi.sock, driverName: Bad_Name}", "csi.driverName"},
		{"csi without node name", "csi: {socket: /p/csi.sock}", "nodeName"},
		{"kubelet port", "nodeName: node1\ncsi: {socket: /p/csi.sock}\nkubernetes: {kubelet: {port: 70000}}", "kubernetes.kubelet.port"},
		{"cert without key", "nodeName: node1\ncsi: {socket: /p/csi.sock}\nkubernetes: {kubelet: {clientCertFile: /c}}", "kubernetes.kubelet.clientCertFile"},
		{"kubelet unverifiable", "kubernetes: {enabled: true, crossCheck: 'off'}", "nodeName"},
		{"bare off", "kubernetes: {crossCheck: off}", "kubernetes.crossCheck: want a string, got a boolean (YAML reads a bare on/off"},
		{"enforce without csi", "nodeName: node-a\nkubernetes: {enabled: true}", "kubernetes.crossCheck: enforce needs the CSI plugin"},
		{"kubelet without credentials", "nodeName: node-a\nkubernetes: {enabled: true, crossCheck: 'off', kubelet: {tokenFile: ''}}", "kubernetes.kubelet.tokenFile"},
		{"anonymous with token", "nodeName: node-a\nkubernetes: {enabled: true, crossCheck: 'off', kubelet: {anonymous: true, tokenFile: /t}}", "kubernetes.kubelet.anonymous"},
		{"empty passwd file", "unix: {passwdFile: ''}", "unix.passwdFile"},
		{"limit off", "workloadAPI: {limits: {maxStreams: 0}}", "workloadAPI.limits.maxStreams: must be positive"},
		{"no reserve", "workloadAPI: {limits: {maxConnections: 10, maxUnattestedConnections: 20}}", "workloadAPI.limits.maxUnattestedConnections"},
		{"tiny requests", "workloadAPI: {limits: {maxRequestBytes: 100}}", "workloadAPI.limits.maxRequestBytes"},
		{"upstream half", "ca: {upstreamKeyFile: /k}", "ca.upstreamCertFile"},
		{"ttl too short", "ca: {jwtSVIDTTL: 1s}", "ca.jwtSVIDTTL"},
		{"not yaml", "trustDomain: [", "YAML"},
		{"duplicate key", "trustDomain: a.org\ntrustDomain: b.org", `"trustDomain" already set`},
		{"duplicate nested key", "ca: {x509SVIDTTL: 1h, x509SVIDTTL: 2h}", "already set"},
		{"empty", "", "config is empty"},
		{"comments only", "# nothing yet\n", "config is empty"},
		{"x509 ttl too long", "ca: {x509SVIDTTL: 13h}", "ca.x509SVIDTTL: must be at most 12h0m0s"},
		{"jwt ttl too long", "ca: {jwtSVIDTTL: 25h}", "ca.jwtSVIDTTL: must be at most 24h0m0s"},
		{"top level list", "- a\n- b", "(top level)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml))
			if err == nil {
				err = cfg.Validate()
			}
			if err == nil {
				t.Fatalf("accepted %q", tc.yaml)
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("error %q does not name %q", err, tc.field)
			}
		})
	}
}

func TestFromArgs(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(file, []byte("trustDomain: file.org\nstateDir: /from/file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := FromArgs([]string{"--config", file, "--trust-domain", "flag.org", "--x509-svid-ttl", "20m"}, env(map[string]string{"MY_NODE_NAME": "n1", "HOST_PROC": "/host/proc"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TrustDomain != "flag.org" {
		t.Errorf("flag did not override file: %q", cfg.TrustDomain)
	}
	if cfg.StateDir != "/from/file" {
		t.Errorf("file value lost: %q", cfg.StateDir)
	}
	if cfg.NodeName != "n1" || cfg.ProcRoot != "/host/proc" {
		t.Errorf("env fallbacks not applied: node %q proc %q", cfg.NodeName, cfg.ProcRoot)
	}
	if time.Duration(cfg.CA.X509SVIDTTL) != 20*time.Minute {
		t.Errorf("ttl %v", cfg.CA.X509SVIDTTL)
	}

	if _, err := FromArgs([]string{"--kubelet-port", "x"}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "kubelet-port") {
		t.Errorf("bad flag value: %v", err)
	}
	if _, err := FromArgs([]string{"--config", filepath.Join(dir, "missing.yaml")}, env(nil), io.Discard); err == nil {
		t.Error("missing config file accepted")
	}
	if _, err := FromArgs([]string{"extra"}, env(nil), io.Discard); err == nil {
		t.Error("stray argument accepted")
	}
}

func TestDevMode(t *testing.T) {
	runtime := t.TempDir()
	cfg, err := FromArgs([]string{"--dev", "--trust-domain", "dev.org"}, env(map[string]string{"XDG_RUNTIME_DIR": runtime}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(runtime, "csi-agent-dev", "state"); cfg.StateDir != want {
		t.Errorf("dev state dir %q, want %q", cfg.StateDir, want)
	}
	if fi, err := os.Stat(filepath.Join(runtime, "csi-agent-dev")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("dev dir not created 0700: %v %v", fi, err)
	}
	if !cfg.Dev || cfg.StateDir == DefaultStateDir || cfg.WorkloadAPI.SocketDir == DefaultSocketDir {
		t.Errorf("dev dirs not applied: %+v", cfg)
	}
	// An explicit flag still wins over dev defaults.
	if cfg.TrustDomain != "dev.org" {
		t.Errorf("flag lost in dev mode: %q", cfg.TrustDomain)
	}
	if cfg.CSI.Socket != "" {
		t.Errorf("CSI on in dev mode: %q", cfg.CSI.Socket)
	}
	if cfg.KubernetesEnabled() {
		t.Error("kubernetes attestation on in dev mode")
	}
	if len(cfg.SVIDs) != 1 || cfg.SVIDs[0].Rules[0].Match["unix.uid"] == "" {
		t.Errorf("dev rule missing: %+v", cfg.SVIDs)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("trustDomain: example.org\ncsi: {socket: /a}\n"))
	f.Add([]byte("svids: [{spiffeID: /a, rules: [{match: {unix.uid: '0'}}]}]"))
	f.Add([]byte("ca: {x509SVIDTTL: 1h}"))
	f.Add([]byte("kubernetes: {kubelet: {port: 1}}"))
	f.Add([]byte("{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		_ = cfg.Validate()
	})
}

// The translators hand each component its defaults, so components take no
// defaults of their own.
func TestTranslators(t *testing.T) {
	cfg := Default()
	cfg.NodeName = "node-a"
	td, err := cfg.TrustDomainID()
	if err != nil {
		t.Fatal(err)
	}
	if o := cfg.CAOptions(td); o.X509SVIDTTL != DefaultX509SVIDTTL || o.JWTSVIDTTL != DefaultJWTSVIDTTL || o.IntermediateTTL != DefaultIntermediateTTL || o.StateDir != filepath.Join(DefaultStateDir, "ca") {
		t.Errorf("CAOptions = %+v", o)
	}
	if o := cfg.UnixOptions(); o.ProcRoot != DefaultProcRoot || o.PasswdFile != DefaultPasswdFile || o.GroupFile != DefaultGroupFile || o.MaxBinarySize != DefaultMaxBinarySize {
		t.Errorf("UnixOptions = %+v", o)
	}
	if o := cfg.KubernetesOptions(nil, nil); o.ProcRoot != DefaultProcRoot || o.CrossCheck != "enforce" || o.RetryBudget != DefaultRetryBudget ||
		o.ContainerWait != DefaultContainerWait || o.MaxCacheAge != DefaultMaxPodListAge || o.RequestTimeout != DefaultKubeletTimeout || o.NodeName != "node-a" {
		t.Errorf("KubernetesOptions = %+v", o)
	}
	for _, tc := range []struct {
		name      string
		mod       func(*Kubelet)
		wantToken string
	}{
		{"default token", func(*Kubelet) {}, DefaultTokenFile},
		{"read-only port drops the default token", func(k *Kubelet) { k.ReadOnlyPort = 10255 }, ""},
		{"anonymous drops the default token", func(k *Kubelet) { k.Anonymous = true }, ""},
		{"client certificate drops the default token", func(k *Kubelet) { k.ClientCertFile, k.ClientKeyFile = "/c", "/k" }, ""},
		{"an explicit token stays", func(k *Kubelet) { k.TokenFile = "/t"; k.ClientCertFile, k.ClientKeyFile = "/c", "/k" }, "/t"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			tc.mod(&c.Kubernetes.Kubelet)
			k := c.KubeletConfig()
			if k.TokenFile != tc.wantToken || k.Host != DefaultKubeletHost || k.Port != DefaultKubeletPort || k.Timeout != DefaultKubeletTimeout || k.NodeName != "node-a" {
				t.Errorf("KubeletConfig = %+v, want token %q", k, tc.wantToken)
			}
		})
	}
}

// A file rewritten in place is read until two reads agree; one that never
// settles is refused rather than applied torn.
func TestLoadRefusesTornReads(t *testing.T) {
	file := filepath.Join(t.TempDir(), "c.yaml")
	full := "trustDomain: full.org\nsvids: [{spiffeID: /a, rules: [{match: {unix.uid: '1'}}]}]\n"
	if err := os.WriteFile(file, []byte(full), 0o600); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// Truncate and rewrite in place, as an editor without rename does.
			_ = os.WriteFile(file, []byte(full[:i%len(full)]), 0o600)
			time.Sleep(time.Millisecond)
		}
	}()
	for range 5 {
		// Refused, or (two reads agreeing by chance) the whole file: never a
		// prefix of it.
		cfg, err := Load(file)
		if err == nil && (cfg.TrustDomain != "full.org" || len(cfg.SVIDs) != 1) {
			t.Fatalf("Load during rewrites applied a torn read: %+v", cfg)
		}
	}
	close(stop)
	<-done
	if err := os.WriteFile(file, []byte(full), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(file)
	if err != nil || cfg.TrustDomain != "full.org" || len(cfg.SVIDs) != 1 {
		t.Fatalf("Load of a settled file: %+v, %v", cfg, err)
	}
}

// Another user must not be able to prepare the --dev directory for us: it
// would hand us their CA key and let them swap the socket.
func TestDevDirRefusesSquatting(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    string
	}{
		{"created fresh", func(*testing.T, string) {}, ""},
		{"ours already", func(t *testing.T, dir string) { mustMkdir(t, dir, 0o700) }, ""},
		{"open to others", func(t *testing.T, dir string) { mustMkdir(t, dir, 0o755); os.Chmod(dir, 0o755) }, "open to other users"},
		{"a symlink", func(t *testing.T, dir string) {
			target := t.TempDir()
			if err := os.Symlink(target, dir); err != nil {
				t.Fatal(err)
			}
		}, "not a directory"},
		{"another user's", func(t *testing.T, dir string) {
			testutil.RequireRoot(t)
			mustMkdir(t, dir, 0o700)
			if err := os.Chown(dir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, "owned by uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			dir := DevDir(env(map[string]string{"TMPDIR": tmp}))
			if filepath.Dir(dir) != tmp {
				t.Fatalf("DevDir = %s, want it in TMPDIR %s", dir, tmp)
			}
			tc.prepare(t, dir)
			_, err := FromArgs([]string{"--dev"}, env(map[string]string{"TMPDIR": tmp}), io.Discard)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("FromArgs --dev: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("FromArgs --dev: %v, want a refusal naming %q", err, tc.want)
			}
		})
	}
}

func mustMkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(dir, mode); err != nil {
		t.Fatal(err)
	}
}
