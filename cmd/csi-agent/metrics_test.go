package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/config"
)

// freeAddr is a loopback address nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
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
		"invalid_request": true, "denied_call_budget": true, "caller_stream_limit": true, "stream_limit": true},
}

func TestMetricsAndHealthEndpoints(t *testing.T) {
	dir := t.TempDir()
	addr := freeAddr(t)
	cfg, err := config.FromArgs([]string{"--dev", "--state-dir", filepath.Join(dir, "state"),
		"--workload-api-socket-dir", filepath.Join(dir, "s"), "--metrics-addr", addr}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	started, done := launch(ctx, cfg)
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
	base := "http://" + addr
	sock := cfg.WorkloadAPI.SocketPath()

	// A real fetch through the socket, and a call refused for its missing
	// security header.
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	defer fcancel()
	svid, err := workloadapi.FetchX509SVID(fctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(fctx, &workloadpb.JWTSVIDRequest{Audience: []string{"db"}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("call without the header: %v", err)
	}

	code, body := httpGet(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`csi_agent_build_info{goversion="`,
		`csi_agent_attestations_total{attestor="unix",result="ok"}`,
		`csi_agent_svids_issued_total{type="x509"} 1`,
		`csi_agent_workload_api_denials_total{reason="missing_security_header"} 1`,
		`csi_agent_workload_api_open_streams `,
		`csi_agent_certificate_expiry_timestamp_seconds{certificate="ca"}`,
		`csi_agent_certificate_expiry_timestamp_seconds{certificate="intermediate"}`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	// Bounded cardinality: no identity in any label value, ours from fixed sets.
	label := regexp.MustCompile(`([a-z_]+)="([^"]*)"`)
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		if strings.Contains(line, "spiffe://") || strings.Contains(line, svid.ID.Path()) {
			t.Errorf("an identity in a series: %s", line)
		}
		if !strings.HasPrefix(line, "csi_agent_") || strings.HasPrefix(line, "csi_agent_build_info") {
			continue
		}
		for _, m := range label.FindAllStringSubmatch(line, -1) {
			if m[1] == "le" {
				continue
			}
			if !labelValues[m[1]][m[2]] {
				t.Errorf("label %s=%q is not from a fixed set: %s", m[1], m[2], line)
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
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	waitReadyz(t, base, http.StatusOK)
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
