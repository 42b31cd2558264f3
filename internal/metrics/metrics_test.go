package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestResult(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, ResultOK},
		{status.Error(codes.PermissionDenied, "no"), ResultDenied},
		{status.Error(codes.InvalidArgument, "bad"), ResultDenied},
		{status.Error(codes.Unavailable, "later"), ResultUnavailable},
		{status.Error(codes.Internal, "bug"), ResultError},
		{errors.New("plain"), ResultError},
	} {
		if got := Result(tc.err); got != tc.want {
			t.Errorf("Result(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// serve runs the handler on a loopback listener until the test ends.
func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, h) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestHandlerHealth(t *testing.T) {
	var (
		mu      sync.Mutex
		failing error
	)
	m := New("test")
	base := serve(t, m.Handler(
		Check{Name: "always", Ready: func() error { return nil }},
		Check{Name: "flaky", Ready: func() error { mu.Lock(); defer mu.Unlock(); return failing }},
	))
	for _, tc := range []struct {
		name     string
		failing  error
		path     string
		wantCode int
		wantBody []string
	}{
		{"ready", nil, "/readyz", 200, []string{"[+]always ok", "[+]flaky ok", "readyz check passed"}},
		{"not ready", errors.New("socket file missing"), "/readyz", 503, []string{"[+]always ok", "[-]flaky failed: socket file missing", "readyz check failed"}},
		{"live while not ready", errors.New("down"), "/livez", 200, []string{"ok"}},
		{"unknown path", nil, "/other", 404, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			failing = tc.failing
			mu.Unlock()
			code, body := get(t, base+tc.path)
			if code != tc.wantCode {
				t.Fatalf("GET %s: %d, want %d: %s", tc.path, code, tc.wantCode, body)
			}
			for _, w := range tc.wantBody {
				if !strings.Contains(body, w) {
					t.Errorf("GET %s body lacks %q:\n%s", tc.path, w, body)
				}
			}
		})
	}
}

func TestMetricsExposition(t *testing.T) {
	m := New("v1.2.3")
	m.Attested("unix", ResultOK)
	m.Denied("no_matching_rule")
	m.Minted("x509", false)
	m.Minted("x509", true)
	m.StreamsOpen(2)
	m.StreamsOpen(-1)
	m.KubeletRequest(errors.New("down"), 30*time.Millisecond)
	m.CSIOperation("publish", nil, time.Millisecond)
	m.WatchRecords(func() int { return 7 })
	caExp, interExp := time.Unix(2000000000, 0), time.Unix(1900000000, 0)
	m.WatchExpiry(func() (time.Time, time.Time) { return caExp, interExp })
	_, body := get(t, serve(t, m.Handler())+"/metrics")
	for _, want := range []string{
		`csi_agent_build_info{goversion="go`,
		`version="v1.2.3"} 1`,
		`csi_agent_attestations_total{attestor="unix",result="ok"} 1`,
		`csi_agent_workload_api_denials_total{reason="no_matching_rule"} 1`,
		`csi_agent_svids_issued_total{type="x509"} 2`,
		`csi_agent_svid_rotations_total{type="x509"} 1`,
		`csi_agent_workload_api_open_streams 1`,
		`csi_agent_kubelet_requests_total{result="error"} 1`,
		`csi_agent_kubelet_request_duration_seconds_count 1`,
		`csi_agent_csi_operations_total{operation="publish",result="ok"} 1`,
		`csi_agent_csi_operation_duration_seconds_count{operation="publish"} 1`,
		`csi_agent_mount_records 7`,
		fmt.Sprintf(`csi_agent_certificate_expiry_timestamp_seconds{certificate="ca"} %g`, float64(caExp.Unix())),
		fmt.Sprintf(`csi_agent_certificate_expiry_timestamp_seconds{certificate="intermediate"} %g`, float64(interExp.Unix())),
		`go_goroutines `,
		`process_open_fds `,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
