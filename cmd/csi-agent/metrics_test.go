package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"iter"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

// metricsAgent is an in-process dev agent serving its metrics endpoint.
type metricsAgent struct {
	base string // http://host:port of /metrics, /livez and /readyz
	sock string // the Workload API socket
}

// publicDir is a temporary directory every uid may traverse, for a caller
// of another uid to reach the socket and run the test binary.
func publicDir(t *testing.T) string { return testutil.PublicTempDir(t, "csi-agent-metrics-") }

// startMetricsAgent runs a dev agent with its metrics on a port the kernel
// picks, which the agent reports back: no free-port race.
func startMetricsAgent(t *testing.T, tweaks ...func(*config.Config)) metricsAgent {
	t.Helper()
	dir := t.TempDir()
	cfg, err := config.FromArgs([]string{"--dev", "--state-dir", filepath.Join(dir, "state"),
		"--workload-api-socket-dir", filepath.Join(publicDir(t), "s"), "--metrics-addr", "127.0.0.1:0"},
		func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, tweak := range tweaks {
		tweak(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan net.Addr, 1)
	started, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- runAgentConfig(ctx, cfg, agentOptions{
			version:          "test",
			started:          func() { close(started) },
			metricsListening: func(a net.Addr) { addr <- a },
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("agent did not start: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not start within 20s")
	}
	select {
	case a := <-addr:
		return metricsAgent{base: "http://" + a.String(), sock: cfg.WorkloadAPI.SocketPath()}
	default:
		t.Fatal("agent started without reporting its metrics address")
		return metricsAgent{}
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// waitReadyz polls /readyz until it answers code.
func waitReadyz(t *testing.T, base string, code int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, body := httpGet(t, base+"/readyz")
		if got == code {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz stayed %d, want %d:\n%s", got, code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scrape parses /metrics as Prometheus does.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d\n%s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics is not the text exposition format: %v", err)
	}
	return fams
}

// series names one series the way the exposition writes it, labels sorted.
func series(name string, labels ...string) string {
	pairs := make([]string, 0, len(labels)/2)
	for i := 0; i+1 < len(labels); i += 2 {
		pairs = append(pairs, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
	}
	slices.Sort(pairs)
	return name + "{" + strings.Join(pairs, ",") + "}"
}

// values are the counters and gauges of the named families, by series.
func values(fams map[string]*dto.MetricFamily, names ...string) map[string]float64 {
	out := map[string]float64{}
	for _, name := range names {
		f := fams[name]
		if f == nil {
			continue
		}
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName(), l.GetValue())
			}
			switch {
			case m.Counter != nil:
				out[series(name, labels...)] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[series(name, labels...)] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

// The series real traffic moves.
const (
	attestationsFamily = "csi_agent_attestations_total"
	denialsFamily      = "csi_agent_workload_api_denials_total"
	issuedFamily       = "csi_agent_svids_issued_total"
	rotationsFamily    = "csi_agent_svid_rotations_total"
	openStreamsFamily  = "csi_agent_workload_api_open_streams"
)

var (
	trafficFamilies = []string{attestationsFamily, denialsFamily, issuedFamily, rotationsFamily, openStreamsFamily}
	unixOK          = series(attestationsFamily, "attestor", "unix", "result", "ok")
	noHeader        = series(denialsFamily, "reason", "missing_security_header")
	noRule          = series(denialsFamily, "reason", "no_matching_rule")
	issuedX509      = series(issuedFamily, "type", "x509")
	issuedJWT       = series(issuedFamily, "type", "jwt")
	openStreams     = series(openStreamsFamily)
)

// settled scrapes once the streams open before the step are all that is
// open: a stream's end is counted after its client has gone.
func settled(t *testing.T, base string, streams float64) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := values(scrape(t, base), trafficFamilies...)
		if v[openStreams] == streams {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s stayed %v, want %v", openStreams, v[openStreams], streams)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func rawClient(t *testing.T, sock string) workloadpb.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return workloadpb.NewSpiffeWorkloadAPIClient(conn)
}

// publicBinary is a copy of the test binary that every uid may run.
func publicBinary(t *testing.T) string {
	t.Helper()
	return testutil.CopyTestBinary(t, publicDir(t), "csi-agent")
}

// uncredentialedCaller runs exe's `csi-agent fetch jwt` as uid 65534,
// which the dev rule (the current user) does not match.
func uncredentialedCaller(t *testing.T, ctx context.Context, exe, sock string) {
	t.Helper()
	cmd := exec.CommandContext(ctx, exe, "fetch", "jwt", "--audience", "db", "--socket", sock, "--timeout", "10s")
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	cmd.Dir = filepath.Dir(exe)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "PermissionDenied") || !strings.Contains(string(out), "no rule matches") {
		t.Fatalf("uid 65534 fetch: %v\n%s", err, out)
	}
}

// TestMetricsCountTraffic drives known traffic through the real socket and
// checks that each step moved the counters by exactly its amount, and no
// other series of theirs.
func TestMetricsCountTraffic(t *testing.T) {
	a := startMetricsAgent(t)
	waitReadyz(t, a.base, http.StatusOK)
	const (
		x509Fetches = 3
		jwtFetches  = 4
		noHeaderJWT = 3
		noHeaderX   = 2
		heldStreams = 3
		strangers   = 2
	)
	for _, step := range []struct {
		name string
		root bool // a caller of another uid: root only
		run  func(t *testing.T, ctx context.Context)
		// want is each series' move; every other series of trafficFamilies
		// must not move.
		want map[string]float64
	}{
		{
			name: "the first x509 fetch mints",
			run: func(t *testing.T, ctx context.Context) {
				if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+a.sock)); err != nil {
					t.Fatalf("FetchX509SVID: %v", err)
				}
			},
			// One attestation: a stream's own mint does not wake it.
			want: map[string]float64{unixOK: 1, issuedX509: 1},
		},
		{
			name: "cached x509 fetches mint nothing",
			run: func(t *testing.T, ctx context.Context) {
				for range x509Fetches {
					if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+a.sock)); err != nil {
						t.Fatalf("FetchX509SVID: %v", err)
					}
				}
			},
			want: map[string]float64{unixOK: x509Fetches},
		},
		{
			name: "jwt fetches with one audience mint once",
			run: func(t *testing.T, ctx context.Context) {
				c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.sock))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				for range jwtFetches {
					if _, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"}); err != nil {
						t.Fatalf("FetchJWTSVID: %v", err)
					}
				}
			},
			want: map[string]float64{unixOK: jwtFetches, issuedJWT: 1},
		},
		{
			name: "another audience is another jwt",
			run: func(t *testing.T, ctx context.Context) {
				if _, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "cache"}, workloadapi.WithAddr("unix://"+a.sock)); err != nil {
					t.Fatalf("FetchJWTSVID: %v", err)
				}
			},
			want: map[string]float64{unixOK: 1, issuedJWT: 1},
		},
		{
			name: "calls without the security header are refused before attestation",
			run: func(t *testing.T, ctx context.Context) {
				c := rawClient(t, a.sock)
				for range noHeaderJWT {
					_, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"db"}})
					if status.Code(err) != codes.InvalidArgument {
						t.Fatalf("FetchJWTSVID without the header: %v", err)
					}
				}
				for range noHeaderX {
					stream, err := c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
					if err == nil {
						_, err = stream.Recv()
					}
					if status.Code(err) != codes.InvalidArgument {
						t.Fatalf("FetchX509SVID without the header: %v", err)
					}
				}
			},
			want: map[string]float64{noHeader: noHeaderJWT + noHeaderX},
		},
		{
			name: "open streams are counted while open",
			run: func(t *testing.T, ctx context.Context) {
				before := values(scrape(t, a.base), openStreamsFamily)[openStreams]
				sctx, cancel := context.WithCancel(ctx)
				defer cancel()
				c := rawClient(t, a.sock)
				hctx := metadata.AppendToOutgoingContext(sctx, "workload.spiffe.io", "true")
				for range heldStreams {
					stream, err := c.FetchX509SVID(hctx, &workloadpb.X509SVIDRequest{})
					if err != nil {
						t.Fatal(err)
					}
					if _, err := stream.Recv(); err != nil {
						t.Fatalf("FetchX509SVID: %v", err)
					}
				}
				// Each stream has sent its first response, so the server
				// holds all of them now.
				if got := values(scrape(t, a.base), openStreamsFamily)[openStreams]; got != before+heldStreams {
					t.Fatalf("%s = %v with %d streams held, want %v", openStreams, got, heldStreams, before+heldStreams)
				}
			},
			want: map[string]float64{unixOK: heldStreams},
		},
		{
			name: "a caller no rule matches",
			root: true,
			run: func(t *testing.T, ctx context.Context) {
				exe := publicBinary(t)
				for range strangers {
					uncredentialedCaller(t, ctx, exe, a.sock)
				}
			},
			want: map[string]float64{unixOK: strangers, noRule: strangers},
		},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.root {
				testutil.RequireRoot(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			before := values(scrape(t, a.base), trafficFamilies...)
			step.run(t, ctx)
			after := settled(t, a.base, before[openStreams])
			for _, k := range slices.Sorted(seriesOf(before, after, step.want)) {
				if got := after[k] - before[k]; got != step.want[k] {
					t.Errorf("%s moved by %v, want %v", k, got, step.want[k])
				}
			}
		})
	}
}

// seriesOf is every series any of ms names.
func seriesOf(ms ...map[string]float64) iter.Seq[string] {
	all := map[string]bool{}
	for _, m := range ms {
		for k := range m {
			all[k] = true
		}
	}
	return maps.Keys(all)
}

// labelValues are the values every label of ours may take: a fixed set.
var labelValues = map[string]map[string]bool{
	"attestor":    {"unix": true, "k8s": true},
	"result":      {"ok": true, "denied": true, "unavailable": true, "error": true},
	"type":        {"x509": true, "jwt": true},
	"operation":   {"publish": true, "unpublish": true},
	"certificate": {"ca": true, "intermediate": true},
	"reason": {"missing_security_header": true, "not_ready": true, "connection_revoked": true,
		"outside_pid_namespace": true, "attestation_unavailable": true, "attestation_failed": true,
		"credentials_changed": true, "caller_exited": true, "no_matching_rule": true, "not_entitled": true,
		"invalid_request": true, "denied_call_budget": true, "caller_stream_limit": true, "stream_limit": true,
		"connection_limit": true, "caller_connection_limit": true, "unattested_connection_limit": true},
}

func TestMetricsAndHealthEndpoints(t *testing.T) {
	a := startMetricsAgent(t)
	base, sock := a.base, a.sock
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A real fetch through the socket, and a call refused for its missing
	// security header.
	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	_, err = rawClient(t, sock).FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"db"}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("call without the header: %v", err)
	}

	fams := scrape(t, base)
	v := values(fams, trafficFamilies...)
	for _, c := range []struct {
		series string
		want   float64 // -1: present, any value
	}{
		{unixOK, -1},
		{issuedX509, 1},
		{noHeader, 1},
		{openStreams, -1},
	} {
		got, ok := v[c.series]
		if !ok || (c.want >= 0 && got != c.want) {
			t.Errorf("/metrics: %s = %v (present: %v), want %v", c.series, got, ok, c.want)
		}
	}
	if b := fams["csi_agent_build_info"]; b == nil || len(b.GetMetric()) != 1 || b.GetMetric()[0].GetGauge().GetValue() != 1 ||
		!slices.ContainsFunc(b.GetMetric()[0].GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == "goversion" && l.GetValue() != "" }) {
		t.Errorf("/metrics: csi_agent_build_info: %v", b)
	}
	expiry := fams["csi_agent_certificate_expiry_timestamp_seconds"]
	certs := map[string]bool{}
	for _, m := range expiry.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "certificate" && m.GetGauge().GetValue() > float64(time.Now().Unix()) {
				certs[l.GetValue()] = true
			}
		}
	}
	if !certs["ca"] || !certs["intermediate"] {
		t.Errorf("/metrics: certificate expiry of ca and intermediate in the future: %v", expiry)
	}
	// Bounded cardinality: no identity in any label value, ours from fixed sets.
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "spiffe://") || strings.Contains(l.GetValue(), svid.ID.Path()) {
					t.Errorf("an identity in a series of %s: %s=%q", name, l.GetName(), l.GetValue())
				}
				if !strings.HasPrefix(name, "csi_agent_") || name == "csi_agent_build_info" || l.GetName() == "le" {
					continue
				}
				if !labelValues[l.GetName()][l.GetValue()] {
					t.Errorf("label %s=%q of %s is not from a fixed set", l.GetName(), l.GetValue(), name)
				}
			}
		}
	}

	if code, body := httpGet(t, base+"/livez"); code != http.StatusOK {
		t.Fatalf("/livez: %d %s", code, body)
	}
	waitReadyz(t, base, http.StatusOK)
	// Something else takes the socket's path: not ready until it is back.
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(sock, 0o700); err != nil {
		t.Fatal(err)
	}
	if body := waitReadyz(t, base, http.StatusServiceUnavailable); !strings.Contains(body, "[-]workload-api failed: socket file missing") {
		t.Fatalf("/readyz body:\n%s", body)
	}
	if code, _ := httpGet(t, base+"/livez"); code != http.StatusOK {
		t.Fatalf("/livez while not ready: %d", code)
	}
	// Still missing a poll later: not ready for as long as it is gone.
	time.Sleep(2 * socketPoll)
	if code, body := httpGet(t, base+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz with the socket still missing: %d\n%s", code, body)
	}
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	if body := waitReadyz(t, base, http.StatusOK); !strings.Contains(body, "[+]workload-api ok") {
		t.Fatalf("/readyz body:\n%s", body)
	}
	// Ready means served: a fetch through the re-created socket works.
	if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock)); err != nil {
		t.Fatalf("FetchX509SVID after /readyz recovered: %v", err)
	}
}

func TestJSONLogs(t *testing.T) {
	socket, proc, stderr := startDevAgentLogged(t, "--logging-format=json")
	// A refused call logs its reason at the default level.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"db"}}); err == nil {
		t.Fatal("call without the header served")
	}
	if err := proc.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	msgs := map[string]map[string]any{}
	deadline := time.Now().Add(10 * time.Second)
	for msgs["Agent stopped"] == nil {
		if time.Now().After(deadline) {
			t.Fatalf("no stop line in:\n%s", stderr)
		}
		time.Sleep(20 * time.Millisecond)
		for _, line := range strings.Split(stderr.String(), "\n") {
			if !strings.HasPrefix(line, "{") {
				// The dev banner is plain text; no log line is.
				if regexp.MustCompile(`^[IWEF]\d{4} `).MatchString(line) {
					t.Fatalf("a klog text line with --logging-format=json: %s", line)
				}
				continue
			}
			var obj map[string]any
			if err := json.Unmarshal([]byte(line), &obj); err != nil {
				t.Fatalf("not JSON: %v: %s", err, line)
			}
			if msg, _ := obj["msg"].(string); msg != "" {
				msgs[msg] = obj
			}
		}
	}
	if msgs["Agent started"] == nil || msgs["Agent started"]["socket"] != socket {
		t.Errorf("start line: %v", msgs["Agent started"])
	}
	if r := msgs["Workload API call refused"]; r == nil || r["reason"] != "missing_security_header" {
		t.Errorf("refusal line: %v", r)
	}
}
