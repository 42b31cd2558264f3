package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

const mainEnv = "CSI_AGENT_TEST_MAIN"

// TestMain lets the test binary be the csi-agent command when re-executed.
func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	return cmd
}

// startDevAgent runs `csi-agent run --dev` with private dirs.
func startDevAgent(t *testing.T, extra ...string) (socket string) {
	t.Helper()
	socket, _ = startDevAgentProcess(t, extra...)
	return socket
}

func startDevAgentProcess(t *testing.T, extra ...string) (socket string, proc *os.Process) {
	t.Helper()
	socket, proc, _ = startDevAgentLogged(t, extra...)
	return socket, proc
}

// startDevAgentLogged is startDevAgentProcess that also hands out what the
// agent writes to stderr.
func startDevAgentLogged(t *testing.T, extra ...string) (socket string, proc *os.Process, stderr *testutil.LockedBuffer) {
	t.Helper()
	dir := t.TempDir()
	socketDir := filepath.Join(dir, "sockets")
	args := append([]string{"run", "--dev", "--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", socketDir}, extra...)
	cmd := command(context.Background(), args...)
	stderr = &testutil.LockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	socket = filepath.Join(socketDir, "agent.sock")
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := command(context.Background(), "healthcheck", "--socket", socket, "--timeout", "1s").CombinedOutput()
		if err == nil && strings.Contains(string(out), "serving") {
			return socket, cmd.Process, stderr
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never became healthy: %s\nagent stderr:\n%s", out, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestDevAgentFetchAndValidate(t *testing.T) {
	socket := startDevAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	outDir := t.TempDir()
	out, err := command(ctx, "fetch", "x509", "--socket", socket, "--out", outDir).CombinedOutput()
	if err != nil {
		t.Fatalf("fetch x509: %v\n%s", err, out)
	}
	wantID := "spiffe://cluster.local/unix/uid/" + strconv.Itoa(os.Getuid())
	if !strings.Contains(string(out), "spiffe_id="+wantID) {
		t.Fatalf("fetch x509 printed %q, want %s", out, wantID)
	}
	for _, f := range []string{"svid.pem", "svid_key.pem", "bundle.pem"} {
		if fi, err := os.Stat(filepath.Join(outDir, f)); err != nil || fi.Size() == 0 {
			t.Errorf("%s not written: %v", f, err)
		}
	}
	if fi, _ := os.Stat(filepath.Join(outDir, "svid_key.pem")); fi != nil && fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v", fi.Mode().Perm())
	}

	out, err = command(ctx, "fetch", "jwt", "--socket", socket, "--audience", "db").CombinedOutput()
	if err != nil {
		t.Fatalf("fetch jwt: %v\n%s", err, out)
	}
	token := regexp.MustCompile(`(?m)^ey[\w-]+\.[\w-]+\.[\w-]+$`).FindString(string(out))
	if token == "" {
		t.Fatalf("no token in %q", out)
	}
	out, err = command(ctx, "validate-jwt", "--socket", socket, "--audience", "db", "--token", token).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "valid spiffe_id="+wantID) {
		t.Fatalf("validate-jwt: %v\n%s", err, out)
	}
	out, err = command(ctx, "validate-jwt", "--socket", socket, "--audience", "other", "--token", token).CombinedOutput()
	if err == nil {
		t.Fatalf("token accepted for the wrong audience: %s", out)
	}

	out, err = command(ctx, "fetch", "bundles", "--socket", socket).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "trust_domain=cluster.local x509_authorities=1") {
		t.Fatalf("fetch bundles: %v\n%s", err, out)
	}
}

func TestSecondAgentDoesNotStealSocket(t *testing.T) {
	socket := startDevAgent(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := command(ctx, "run", "--dev", "--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", filepath.Dir(socket)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "live process") {
		t.Fatalf("second agent: %v\n%s", err, out)
	}
	if out, err := command(ctx, "healthcheck", "--socket", socket).CombinedOutput(); err != nil {
		t.Fatalf("first agent hurt: %v %s", err, out)
	}
}

func TestBadConfigRefusesToStart(t *testing.T) {
	cases := []struct {
		name, yaml, want string
	}{
		{"unknown field", "trustDomain: a.org\nworkloadAPI: {sockDir: /x}\n", "workloadAPI.sockDir: unknown field"},
		{"bad rule", "svids: [{spiffeID: /a, rules: [{selectors: ['k8s:nope:x']}]}]\n", "svids[0].rules[0].selectors[0]"},
		{"empty rule", "svids: [{spiffeID: /a, rules: [{}]}]\n", "svids[0].rules[0]"},
		{"foreign trust domain", "svids: [{spiffeID: 'spiffe://other.org/a', rules: [{match: {unix.uid: '0'}}]}]\n", "svids[0].spiffeID"},
		{"missing federation file", "federation: [{trustDomain: other.org, path: /nonexistent/bundle.json}]\n", "federation[0]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			file := filepath.Join(dir, "config.yaml")
			if err := os.WriteFile(file, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := command(ctx, "run", "--config", file, "--state-dir", filepath.Join(dir, "state"), "--workload-api-socket-dir", filepath.Join(dir, "s")).CombinedOutput()
			if err == nil {
				t.Fatal("agent started with a malformed config")
			}
			if !strings.Contains(string(out), tc.want) {
				t.Fatalf("error does not name %q:\n%s", tc.want, out)
			}
			if _, err := os.Stat(filepath.Join(dir, "s", "agent.sock")); err == nil {
				t.Error("socket created despite the bad config")
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, args := range [][]string{{}, {"frobnicate"}, {"fetch"}, {"fetch", "pem"}, {"fetch", "jwt"}, {"validate-jwt"}} {
		if out, err := command(ctx, args...).CombinedOutput(); err == nil {
			t.Errorf("%v succeeded: %s", args, out)
		}
	}
	out, err := command(ctx, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) == "" {
		t.Errorf("version: %v %q", err, out)
	}
}

func TestSIGHUPReloadReachesOpenStreams(t *testing.T) {
	uid := strconv.Itoa(os.Getuid())
	file := filepath.Join(t.TempDir(), "config.yaml")
	writeRules := func(path string) {
		t.Helper()
		cfg := "svids: [{spiffeID: " + path + ", rules: [{match: {unix.uid: '" + uid + "'}}]}]\n"
		if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeRules("/before")
	socket, proc := startDevAgentProcess(t, "--config", file)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ids := make(chan string, 16)
	go func() { _ = client.WatchX509Context(ctx, idWatcher(ids)) }()
	waitID := func(want string) {
		t.Helper()
		for {
			select {
			case got := <-ids:
				if got == want {
					return
				}
			case <-ctx.Done():
				t.Fatalf("stream never delivered %s", want)
			}
		}
	}
	waitID("spiffe://cluster.local/before")

	writeRules("/after")
	if err := proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitID("spiffe://cluster.local/after")

	// A broken config keeps the running rules.
	if err := os.WriteFile(file, []byte("svids: [{spiffeID: /x, rules: [{}]}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	svid, err := client.FetchX509SVID(ctx)
	if err != nil || svid.ID.String() != "spiffe://cluster.local/after" {
		t.Fatalf("after a broken reload: %v %v", svid, err)
	}
}

type idWatcher chan string

func (w idWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w <- c.DefaultSVID().ID.String() }
func (idWatcher) OnX509ContextWatchError(error)                    {}

// A deleted Workload API socket comes back, served by the same agent, and
// an SVID can be fetched through it again.
func TestDeletedSocketIsRecreated(t *testing.T) {
	socket := startDevAgent(t)
	for round := range 2 {
		if err := os.Remove(socket); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			out, err := command(context.Background(), "fetch", "x509", "--socket", socket, "--timeout", "1s").CombinedOutput()
			if err == nil && strings.Contains(string(out), "spiffe://") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: no SVID through the socket after deleting it: %v %s", round, err, out)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
