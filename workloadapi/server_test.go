package workloadapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/peer"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/testutil"
)

const childEnv = "WORKLOADAPI_TEST_CHILD"

// TestMain lets the test binary act as a workload process: re-executed with
// childEnv set, it calls the Workload API and prints what it got.
func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "":
		os.Exit(m.Run())
	case "x509":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		x509ctx, err := workloadapi.FetchX509Context(ctx)
		if err != nil {
			fmt.Printf("error=%s\n", status.Code(err))
			os.Exit(0)
		}
		for _, s := range x509ctx.SVIDs {
			fmt.Printf("id=%s\n", s.ID)
		}
		os.Exit(0)
	case "setuid-after-connect":
		// Connect and ask as root, then change uid and ask again on the
		// same connection, as a process that exec'd a setuid binary would.
		sock := strings.TrimPrefix(os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "unix://")
		conn, err := dialRaw(sock)
		if err != nil {
			os.Exit(1)
		}
		c := workloadpb.NewSpiffeWorkloadAPIClient(conn)
		ask := func() string {
			resp, err := c.FetchJWTSVID(withHeader(context.Background()), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
			if err != nil {
				return status.Code(err).String()
			}
			return resp.Svids[0].SpiffeId
		}
		first := ask()
		if err := syscall.Setresuid(65534, 65534, 65534); err != nil {
			fmt.Println("setresuid:", err)
			os.Exit(1)
		}
		fmt.Printf("first=%s second=%s\n", first, ask())
		os.Exit(0)
	case "block":
		// Connect, then wait for the parent to act; the RPC runs then.
		sock := strings.TrimPrefix(os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "unix://")
		conn, err := dialRaw(sock)
		if err != nil {
			os.Exit(1)
		}
		_, _ = workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(withHeader(context.Background()), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
		select {}
	}
}

func selfUID() string { return strconv.Itoa(os.Getuid()) }

func defaultSVIDs() []rules.SVID {
	return []rules.SVID{uidRule("/unix/uid/{unix.uid}", selfUID())}
}

func verifyX509(t *testing.T, svid *x509svid.SVID, bundle *x509bundle.Bundle) {
	t.Helper()
	chainDER := make([][]byte, len(svid.Certificates))
	for i, c := range svid.Certificates {
		chainDER[i] = c.Raw
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	var flat []byte
	for _, d := range chainDER {
		flat = append(flat, d...)
	}
	if _, err := x509svid.ParseRaw(flat, keyDER); err != nil {
		t.Fatalf("ParseRaw: %v", err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("Verify: %v", err)
	}
}

func TestFetchX509SVIDWithGoSpiffe(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	want := spiffeid.RequireFromString("spiffe://example.org/unix/uid/" + selfUID())
	if len(x509ctx.SVIDs) != 1 || x509ctx.SVIDs[0].ID != want {
		t.Fatalf("got %+v, want %s", x509ctx.SVIDs, want)
	}
	bundle, err := x509ctx.Bundles.GetX509BundleForTrustDomain(want.TrustDomain())
	if err != nil {
		t.Fatal(err)
	}
	verifyX509(t, x509ctx.SVIDs[0], bundle)
}

func TestJWTSVIDAndValidate(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatal(err)
	}
	jwtBundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), jwtBundles, []string{"db"})
	if err != nil {
		t.Fatalf("ParseAndValidate: %v", err)
	}
	if parsed.ID.String() != "spiffe://example.org/unix/uid/"+selfUID() {
		t.Errorf("sub %s", parsed.ID)
	}
	got, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "db")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if got.ID != parsed.ID {
		t.Errorf("validated %s, want %s", got.ID, parsed.ID)
	}
	if _, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "other"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("wrong audience: %v", err)
	}
}

func TestRawErrors(t *testing.T) {
	a := startAgent(t, agentConfig{svids: []rules.SVID{uidRule("/nobody-here", "4000000")}})
	c := rawClient(t, a.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	recvCode := func(stream interface {
		Recv() (*workloadpb.X509SVIDResponse, error)
	}, err error) codes.Code {
		if err != nil {
			return status.Code(err)
		}
		_, err = stream.Recv()
		return status.Code(err)
	}
	cases := []struct {
		name string
		call func() codes.Code
		want codes.Code
	}{
		{"x509 without header", func() codes.Code { return recvCode(c.FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})) }, codes.InvalidArgument},
		{"jwt without header", func() codes.Code {
			_, err := c.FetchJWTSVID(ctx, &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"x509 no matching rule", func() codes.Code { return recvCode(c.FetchX509SVID(withHeader(ctx), &workloadpb.X509SVIDRequest{})) }, codes.PermissionDenied},
		{"jwt no matching rule", func() codes.Code {
			_, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
			return status.Code(err)
		}, codes.PermissionDenied},
		{"x509 bundles no matching rule", func() codes.Code {
			st, err := c.FetchX509Bundles(withHeader(ctx), &workloadpb.X509BundlesRequest{})
			if err != nil {
				return status.Code(err)
			}
			_, err = st.Recv()
			return status.Code(err)
		}, codes.PermissionDenied},
		{"jwt bundles no matching rule", func() codes.Code {
			st, err := c.FetchJWTBundles(withHeader(ctx), &workloadpb.JWTBundlesRequest{})
			if err != nil {
				return status.Code(err)
			}
			_, err = st.Recv()
			return status.Code(err)
		}, codes.PermissionDenied},
		{"jwt empty audience", func() codes.Code {
			_, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"jwt blank audience value", func() codes.Code {
			_, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{""}})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"validate bad token", func() codes.Code {
			_, err := c.ValidateJWTSVID(withHeader(ctx), &workloadpb.ValidateJWTSVIDRequest{Audience: "a", Svid: "not.a.jwt"})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"validate no audience", func() codes.Code {
			_, err := c.ValidateJWTSVID(withHeader(ctx), &workloadpb.ValidateJWTSVIDRequest{Svid: "x"})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"validate no svid", func() codes.Code {
			_, err := c.ValidateJWTSVID(withHeader(ctx), &workloadpb.ValidateJWTSVIDRequest{Audience: "a"})
			return status.Code(err)
		}, codes.InvalidArgument},
		{"wit unimplemented", func() codes.Code {
			s, err := c.FetchWITSVID(withHeader(ctx), &workloadpb.WITSVIDRequest{})
			if err != nil {
				return status.Code(err)
			}
			_, err = s.Recv()
			return status.Code(err)
		}, codes.Unimplemented},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.call(); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestForeignTokenRejected(t *testing.T) {
	// A token minted by an unrelated agent must not validate here.
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	b := startAgent(t, agentConfig{svids: defaultSVIDs()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "x"}, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), "x", workloadapi.WithAddr(b.addr())); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("foreign token: %v", err)
	}
}

func TestUnavailableWhileStarting(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs(), notReady: true})
	c := rawClient(t, a.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v", err)
	}
	a.server.SetReady(true)
	if _, err := c.FetchJWTSVID(withHeader(ctx), &workloadpb.JWTSVIDRequest{Audience: []string{"a"}}); err != nil {
		t.Fatalf("after ready: %v", err)
	}
}

func TestRotationSeenByWatcher(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs(), x509TTL: 2 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	serials := make(chan string, 16)
	w := watcherFunc(func(c *workloadapi.X509Context) {
		serials <- c.DefaultSVID().Certificates[0].SerialNumber.String()
	})
	go func() { _ = client.WatchX509Context(ctx, w) }()
	seen := map[string]bool{}
	for len(seen) < 3 {
		select {
		case s := <-serials:
			seen[s] = true
		case <-ctx.Done():
			t.Fatalf("saw %d distinct SVIDs before timeout, want 3", len(seen))
		}
	}
}

type watcherFunc func(*workloadapi.X509Context)

func (f watcherFunc) OnX509ContextUpdate(c *workloadapi.X509Context) { f(c) }
func (watcherFunc) OnX509ContextWatchError(error)                    {}

// writeUpstreamCA creates a CA certificate and key as a Secret would hold them.
func writeUpstreamCA(t *testing.T) [2]string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "upstream"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return [2]string{cert, keyFile}
}

func TestTwoAgentsSharingUpstreamCA(t *testing.T) {
	up := writeUpstreamCA(t)
	a := startAgent(t, agentConfig{svids: defaultSVIDs(), upstream: up})
	b := startAgent(t, agentConfig{svids: defaultSVIDs(), upstream: up})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	fromA, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	bundlesB, err := workloadapi.FetchX509Bundles(ctx, workloadapi.WithAddr(b.addr()))
	if err != nil {
		t.Fatal(err)
	}
	bundleB, err := bundlesB.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("example.org"))
	if err != nil {
		t.Fatal(err)
	}
	verifyX509(t, fromA.DefaultSVID(), bundleB)

	jwtA, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "svc"}, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	got, err := workloadapi.ValidateJWTSVID(ctx, jwtA.Marshal(), "svc", workloadapi.WithAddr(b.addr()))
	if err != nil {
		t.Fatalf("B rejected A's JWT-SVID: %v", err)
	}
	if got.ID != jwtA.ID {
		t.Errorf("validated %s, want %s", got.ID, jwtA.ID)
	}
	// Agents with their own CAs stay separate trust anchors.
	if a.authority.Bundle().X509Authorities()[0].Equal(startAgent(t, agentConfig{svids: defaultSVIDs()}).authority.Bundle().X509Authorities()[0]) {
		t.Error("self-managed agent shares the upstream anchor")
	}
}

func TestRestartKeepsCA(t *testing.T) {
	state := t.TempDir()
	a := startAgent(t, agentConfig{svids: defaultSVIDs(), stateDir: state})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	a.stop()
	b := startAgent(t, agentConfig{svids: defaultSVIDs(), stateDir: state})
	bundles, err := workloadapi.FetchX509Bundles(ctx, workloadapi.WithAddr(b.addr()))
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := bundles.GetX509BundleForTrustDomain(before.ID.TrustDomain())
	if err != nil {
		t.Fatal(err)
	}
	verifyX509(t, before, bundle)
}

func TestFederatedBundles(t *testing.T) {
	// The federated trust domain's bundle: another agent's CA, as a JWKS file.
	other := startAgent(t, agentConfig{td: "other.org", svids: defaultSVIDs()})
	file := filepath.Join(t.TempDir(), "other.json")
	writeBundle(t, other, file)
	a := startAgent(t, agentConfig{svids: federating(defaultSVIDs(), "other.org"), federation: []federation.Source{{TrustDomain: "other.org", Path: file}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	otherTD := spiffeid.RequireTrustDomainFromString("other.org")
	fb, err := x509ctx.Bundles.GetX509BundleForTrustDomain(otherTD)
	if err != nil {
		t.Fatalf("federated bundle missing: %v", err)
	}
	// An SVID of the other trust domain verifies against what we serve.
	otherSVID, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(other.addr()))
	if err != nil {
		t.Fatal(err)
	}
	verifyX509(t, otherSVID, fb)

	jwtBundles, err := workloadapi.FetchJWTBundles(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtBundles.GetJWTBundleForTrustDomain(otherTD); err != nil {
		t.Fatalf("federated JWT bundle missing: %v", err)
	}
	// A JWT-SVID of the federated domain validates through our agent.
	otherJWT, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "x"}, workloadapi.WithAddr(other.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := workloadapi.ValidateJWTSVID(ctx, otherJWT.Marshal(), "x", workloadapi.WithAddr(a.addr())); err != nil {
		t.Fatalf("federated JWT: %v", err)
	}

	// Replacing the file's bundle reaches open bundle streams.
	third := startAgent(t, agentConfig{td: "other.org", svids: defaultSVIDs()})
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	updates := make(chan *x509bundle.Set, 8)
	go func() { _ = client.WatchX509Bundles(ctx, bundleWatcher(updates)) }()
	<-updates
	newData, err := third.authority.Bundle().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, newData, 0o644); err != nil {
		t.Fatal(err)
	}
	want := third.authority.Bundle().X509Authorities()[0]
	for {
		select {
		case set := <-updates:
			if b, ok := set.Get(otherTD); ok && b.HasX509Authority(want) {
				return
			}
		case <-ctx.Done():
			t.Fatal("bundle stream never delivered the reloaded federated bundle")
		}
	}
}

type bundleWatcher chan *x509bundle.Set

func (w bundleWatcher) OnX509BundlesUpdate(s *x509bundle.Set) { w <- s }
func (bundleWatcher) OnX509BundlesWatchError(error)           {}

var _ = spiffebundle.New

func TestSocketNotStolen(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	_, err := Listen(filepath.Dir(a.socket), filepath.Base(a.socket))
	if !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// The first agent still answers.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(a.addr())); err != nil {
		t.Fatalf("original agent broken: %v", err)
	}
	// A stale socket of a dead agent is replaced.
	a.stop()
	l, err := Listen(filepath.Dir(a.socket), filepath.Base(a.socket))
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l.Close()
}

// testBinary copies the test binary where a dropped-privilege child can run it.
func testBinary(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(publicTempDir(t), "child")
	in, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
	return dst
}

func TestOtherUIDGetsItsOwnIdentity(t *testing.T) {
	testutil.RequireRoot(t)
	a := startAgent(t, agentConfig{svids: []rules.SVID{
		uidRule("/root", "0"),
		uidRule("/nobody", "65534"),
	}})
	cmd := exec.Command(testBinary(t), "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=x509", "SPIFFE_ENDPOINT_SOCKET="+a.addr())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "id=spiffe://example.org/nobody" {
		t.Fatalf("child as uid 65534 got %q", got)
	}
}

func TestPIDReuseGuard(t *testing.T) {
	// The caller connects and asks; between attestation and the liveness
	// check it exits and is reaped. The answer must be no SVID.
	var (
		mu     sync.Mutex
		codesG = map[string]codes.Code{}
	)
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if p, ok := peer.FromContext(ctx); ok {
			mu.Lock()
			codesG[strconv.Itoa(int(p.PID))] = status.Code(err)
			mu.Unlock()
		}
		return resp, err
	}
	a := startAgent(t, agentConfig{svids: []rules.SVID{{SPIFFEID: "/anyone", Rules: []rules.Rule{{Match: map[string]string{"unix.uid": selfUID()}}}}}, unary: unary})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=block", "SPIFFE_ENDPOINT_SOCKET="+a.addr())
	var pidOfChild atomic.Int32
	reaped := make(chan struct{})
	var once sync.Once
	hook := func(pid int32) {
		if pid != pidOfChild.Load() {
			return
		}
		once.Do(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			close(reaped)
		})
	}
	a.server.afterAttest.Store(&hook)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	childPID := int32(cmd.Process.Pid)
	pidOfChild.Store(childPID)
	select {
	case <-reaped:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("child never reached attestation")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		code, ok := codesG[strconv.Itoa(int(childPID))]
		mu.Unlock()
		if ok {
			if code != codes.PermissionDenied {
				t.Fatalf("exited caller got %s, want PermissionDenied", code)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no answer recorded for the child's RPC")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCredentialsChangedAfterConnectDenied(t *testing.T) {
	testutil.RequireRoot(t)
	a := startAgent(t, agentConfig{svids: []rules.SVID{
		uidRule("/root", "0"),
		uidRule("/nobody", "65534"),
	}})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=setuid-after-connect", "SPIFFE_ENDPOINT_SOCKET="+a.addr())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	// The kernel recorded uid 0 at connect; procfs now says 65534. Neither
	// identity may be handed out on that connection, which the agent closes
	// (so the client may see the transport go rather than the status).
	got := strings.TrimSpace(string(out))
	if got != "first=spiffe://example.org/root second=PermissionDenied" && got != "first=spiffe://example.org/root second=Unavailable" {
		t.Fatalf("child reported %q", got)
	}
}

func TestStreamEndsWhenEntitlementIsLost(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	c := rawClient(t, a.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := c.FetchX509SVID(withHeader(ctx), &workloadpb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	bundles, err := c.FetchX509Bundles(withHeader(ctx), &workloadpb.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bundles.Recv(); err != nil {
		t.Fatal(err)
	}
	sds, err := sdsClient(t, a.socket).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := sds.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := sds.Recv(); err != nil {
		t.Fatal(err)
	}
	// A reload whose rules no longer match this caller.
	set, err := rules.Compile(spiffeid.RequireTrustDomainFromString("example.org"), []rules.SVID{uidRule("/someone-else", "4000000")})
	if err != nil {
		t.Fatal(err)
	}
	a.server.SetRules(set)
	if _, err := stream.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("after the entitlement was lost the stream gave %v, want PermissionDenied", err)
	}
	if _, err := bundles.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("bundle stream: %v, want PermissionDenied", err)
	}
	if _, err := sds.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("SDS stream: %v, want PermissionDenied", err)
	}
}

// A caller whose credentials changed is told why: PermissionDenied with the
// reason, on that call and on any later one on the same connection, before
// the connection goes.
func TestCredentialsChangedRefusalCarriesReason(t *testing.T) {
	testutil.RequireRoot(t)
	a := startAgent(t, agentConfig{svids: []rules.SVID{
		uidRule("/root", "0"),
		uidRule("/nobody", "65534"),
	}})
	for i := range 5 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"=setuid-after-connect", "SPIFFE_ENDPOINT_SOCKET="+a.addr())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
		if got := strings.TrimSpace(string(out)); got != "first=spiffe://example.org/root second=PermissionDenied" {
			t.Fatalf("run %d: child reported %q, want PermissionDenied rather than a dropped connection", i, got)
		}
	}
}
