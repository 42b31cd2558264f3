// Package attack runs the agent as it runs on a node, inside a real memory
// cgroup with the DaemonSet's 256 MiB limit, and attacks it from real
// unprivileged users: with no identity (idle connections, health streams,
// denied calls) and with one (stream floods, oversized requests). After
// each attack an entitled workload must still get its SVID at once, and the
// kernel must have killed nothing.
package attack

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

const (
	memoryLimit = 256 << 20 // the DaemonSet's limit
	// Users: nobody has no identity; entitledUID has one, as root does.
	nobodyUID   = 65534
	entitledUID = 65533
	otherUID    = 65532 // no identity either
)

func TestMain(m *testing.M) {
	if os.Getenv(attackEnv) != "" {
		runAttacker()
	}
	os.Exit(m.Run())
}

type agent struct {
	self   string
	socket string
	cmd    *exec.Cmd
	cg     *memcg
	log    string
}

func startAgent(t *testing.T) *agent { t.Helper(); return startAgentWith(t, "") }

// startAgentWith starts the agent with extra YAML added to its config.
func startAgentWith(t *testing.T, extra string) *agent {
	t.Helper()
	return startAgentLimited(t, extra, 0)
}

// startAgentLimited also sets the agent's open-file limit (soft and hard)
// when nofile > 0.
func startAgentLimited(t *testing.T, extra string, nofile int) *agent {
	t.Helper()
	dir := testutil.PublicTempDir(t, "csi-agent-attack-") // other users reach the socket
	// CSI_AGENT_ATTACK_BIN runs another build, e.g. an older one side by side.
	bin := os.Getenv("CSI_AGENT_ATTACK_BIN")
	if bin == "" {
		bin = filepath.Join(dir, "csi-agent")
		build := exec.Command("go", "build", "-o", bin, "./cmd/csi-agent")
		build.Dir = "../.."
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build agent: %v\n%s", err, out)
		}
	}
	cfg := filepath.Join(dir, "config.yaml")
	rules := fmt.Sprintf("svids:\n- spiffeID: /uid/{unix.uid}\n  rules:\n  - match: {unix.uid: '0'}\n  - match: {unix.uid: '%d'}\n", entitledUID)
	if err := os.WriteFile(cfg, []byte(rules+extra), 0o644); err != nil {
		t.Fatal(err)
	}
	// A copy of this test binary, which other users may run, plays the
	// attackers.
	self := testutil.CopyTestBinary(t, dir, "attacker")
	a := &agent{self: self, socket: filepath.Join(dir, "sockets", "agent.sock"), cg: newMemcg(t, memoryLimit), log: filepath.Join(dir, "agent.log")}
	logf, err := os.Create(a.log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { logf.Close() })
	// The shell joins the cgroup and then becomes the agent, so that every
	// byte the agent ever uses is charged to the limit.
	limit := ""
	if nofile > 0 {
		limit = fmt.Sprintf("ulimit -n %d && ", nofile)
	}
	a.cmd = exec.Command("/bin/sh", "-c", limit+`echo $$ > "$0/cgroup.procs" && exec "$@"`, a.cg.dir,
		bin, "run", "--dev", "--config", cfg, "--state-dir", filepath.Join(dir, "state"),
		"--workload-api-socket-dir", filepath.Join(dir, "sockets"))
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = a.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = a.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = a.cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for a.fetch() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("agent never served: %s", a.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return a
}

// fetch gets an X.509-SVID as the entitled test process does.
func (a *agent) fetch() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+a.socket))
	if err != nil {
		return err
	}
	if !strings.HasSuffix(svid.ID.String(), "/uid/0") {
		return fmt.Errorf("got %s", svid.ID)
	}
	return nil
}

func (a *agent) logTail() string {
	data, _ := os.ReadFile(a.log)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// attacker is an attack in place, in a child process running as uid.
type attacker struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	report string
}

func (a *agent) attack(t *testing.T, uid int, kind string, n int) *attacker {
	t.Helper()
	cmd := exec.Command(a.self, "-test.run=^$")
	cmd.Env = append(os.Environ(), attackEnv+"="+kind, socketEnv+"="+a.socket, fmt.Sprintf("%s=%d", sizeEnv, n))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	at := &attacker{cmd: cmd, stdin: stdin}
	t.Cleanup(at.stop)
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		lines <- strings.TrimSpace(line)
	}()
	select {
	case line := <-lines:
		if !strings.HasPrefix(line, "ready ") {
			t.Fatalf("attacker %s: %q", kind, line)
		}
		at.report = strings.TrimPrefix(line, "ready ")
	case <-time.After(90 * time.Second):
		t.Fatalf("attacker %s never got its attack in place", kind)
	}
	t.Logf("%s as uid %d: %s", kind, uid, at.report)
	return at
}

func (at *attacker) stop() {
	if at.stdin == nil {
		return
	}
	at.stdin.Close()
	at.stdin = nil
	done := make(chan struct{})
	go func() { _ = at.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = at.cmd.Process.Kill()
		<-done
	}
}

// count reads "key=N" from a report.
func (at *attacker) count(t *testing.T, key string) int {
	t.Helper()
	for _, f := range strings.Fields(at.report) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			var n int
			fmt.Sscan(v, &n)
			return n
		}
	}
	t.Fatalf("report %q has no %s", at.report, key)
	return 0
}

// stillServes checks, while an attack holds, that an entitled workload gets
// its SVID and that nothing was killed for memory.
func (a *agent) stillServes(t *testing.T, during string) {
	t.Helper()
	start := time.Now()
	if err := a.fetch(); err != nil {
		t.Fatalf("during %s an entitled workload got no SVID: %v\n%s", during, err, a.logTail())
	}
	if n := a.cg.ooms(t); n != 0 {
		t.Fatalf("during %s the kernel killed %d processes of the agent's cgroup", during, n)
	}
	if err := a.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("during %s the agent died: %v", during, err)
	}
	t.Logf("during %s: SVID in %v, cgroup peak %d MiB", during, time.Since(start).Round(time.Millisecond), a.cg.peak()>>20)
}

func TestAttacksUnderMemoryLimit(t *testing.T) {
	testutil.RequireRoot(t)
	a := startAgent(t)

	for _, tc := range []struct {
		name, kind string
		uid, n     int
		// check reads the attacker's report: key's count must be at most
		// max, or (max < 0) above zero.
		key string
		max int
	}{
		{"12,000 idle connections without identity", "idle-connections", nobodyUID, 12000, "open", 1024},
		{"22,000 health Watch streams without identity", "health-watch", nobodyUID, 22000, "served", 1024},
		{"a flood of denied calls", "denied-flood", nobodyUID, 3000, "exhausted", -1},
		{"18,000 X.509 streams of an entitled caller", "x509-streams", entitledUID, 18000, "served", 1024},
	} {
		t.Run(tc.name, func(t *testing.T) {
			at := a.attack(t, tc.uid, tc.kind, tc.n)
			switch got := at.count(t, tc.key); {
			case tc.max < 0 && got == 0:
				t.Errorf("%s: no call was refused before attestation (%s)", tc.name, at.report)
			case tc.max >= 0 && got > tc.max:
				t.Errorf("%s: the agent gave one caller %d (%s); the limit is %d", tc.name, got, tc.key, tc.max)
			}
			a.stillServes(t, tc.name)
			at.stop()
		})
	}
	t.Run("oversized JWT audiences", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.socket))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		big := strings.Repeat("a", 3<<20)
		for i := range 40 {
			_, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: fmt.Sprint(i, big)})
			if c := status.Code(err); c != codes.InvalidArgument && c != codes.ResourceExhausted {
				t.Fatalf("call %d with a 3 MB audience: %v", i, err)
			}
		}
		a.stillServes(t, "40 calls with 3 MB audiences")
	})
	t.Logf("cgroup peak over all attacks: %d MiB of %d", a.cg.peak()>>20, memoryLimit>>20)
}

// With an open-file limit below the configured connections, the agent
// keeps descriptors in reserve (for the CSI socket, the kubelet, its files)
// however many connections a caller opens.
func TestConnectionsFitTheOpenFileLimit(t *testing.T) {
	testutil.RequireRoot(t)
	const nofile = 1024
	a := startAgentLimited(t, "", nofile)
	at := a.attack(t, nobodyUID, "idle-connections", 5000)
	if fds := countFDs(a.cmd.Process.Pid); fds > nofile-256 {
		t.Errorf("the agent holds %d descriptors of its %d during the flood: no reserve left", fds, nofile)
	} else {
		t.Logf("agent descriptors during 5,000 idle connections: %d of %d (%s)", fds, nofile, at.report)
	}
	a.stillServes(t, "5,000 idle connections with 1,024 open files")
	at.stop()
}
