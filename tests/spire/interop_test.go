package spire

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Federation through bundle endpoints of the https_spiffe profile, both
// ways, with a real SPIRE: each side's workload verifies the other's
// X.509-SVID in an mTLS handshake and its JWT-SVID, and a SPIRE CA
// rotation reaches our workload's open stream without a restart.
func TestFederationHTTPSSPIFFE(t *testing.T) {
	dir := shortTempDir(t)
	ports := freePorts(t, 3)
	spirePort, spireBE, oursBEPort := ports[0], ports[1], ports[2]
	p := profile{name: "https_spiffe"}

	s := startSPIREServer(t, dir, spirePort, spireBE, oursBEPort, p)
	// Out of band, as the spec has it: SPIRE's bundle for our agent...
	spireInitial := filepath.Join(dir, "spire-bundle.json")
	writeFile(t, spireInitial, []byte(s.mustCLI("bundle show", "-format", "spiffe")))
	ours := startOurAgent(t, dir, oursBEPort, spireBE, p, spireInitial)
	// ...and ours for SPIRE, after which each side refreshes from the
	// other's endpoint.
	oursPEM := filepath.Join(dir, "csi-bundle.pem")
	writeFile(t, oursPEM, ours.ourBundlePEM(t))
	s.mustCLI("bundle set", "-id", oursTD.IDString(), "-format", "pem", "-path", oursPEM)
	s.waitOurBundle(true)
	eventually(t, 30*time.Second, "our agent kept SPIRE's bundle fetched from its endpoint", func() error {
		_, err := os.Stat(filepath.Join(ours.stateDir, "federation", "spire.test.json"))
		return err
	})
	s.startAgent()

	mtlsBothWays(t, ours, s)
	jwtBothWays(t, ours, s)

	// A SPIRE CA rotation: the prepared authority enters SPIRE's bundle at
	// once, and must reach our workload's open bundle stream.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client, err := workloadapi.New(ctx, ours.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	updates := make(chan *x509bundle.Set, 16)
	go func() { _ = client.WatchX509Bundles(ctx, bundleWatcher(updates)) }()
	before := spireAuthorities(t, <-updates)
	pid := ours.proc.cmd.Process.Pid
	out := s.mustCLI("localauthority x509 prepare")
	_, authorityID, _ := strings.Cut(out, "Authority ID: ")
	authorityID, _, _ = strings.Cut(authorityID, "\n")
	if authorityID = strings.TrimSpace(authorityID); authorityID == "" {
		t.Fatalf("localauthority x509 prepare said %q", out)
	}
	start := time.Now()
	for got := before; got <= before; {
		select {
		case set := <-updates:
			got = spireAuthorities(t, set)
		case <-ctx.Done():
			t.Fatalf("SPIRE's prepared X.509 authority never reached our workload (still %d authorities)", before)
		}
	}
	t.Logf("SPIRE's new X.509 authority reached our workload's stream in %s", time.Since(start).Round(time.Millisecond))
	if ours.proc.exited() || ours.proc.cmd.Process.Pid != pid {
		t.Fatal("our agent restarted")
	}
	s.mustCLI("localauthority x509 activate", "-authorityID", authorityID)
	mtlsBothWays(t, ours, s)
}

// The same with the https_web profile: each endpoint serves a certificate
// of a test CA that the other side trusts, and no bootstrap bundle is
// needed.
func TestFederationHTTPSWeb(t *testing.T) {
	dir := shortTempDir(t)
	ports := freePorts(t, 3)
	spirePort, spireBE, oursBEPort := ports[0], ports[1], ports[2]
	caFile, certs, keys := webPKI(t, dir, "web", "spire-endpoint", "our-endpoint")
	p := profile{name: "https_web", caFile: caFile, spireCert: certs[0], spireKey: keys[0], oursCert: certs[1], oursKey: keys[1]}

	ours := startOurAgent(t, dir, oursBEPort, spireBE, p, "")
	s := startSPIREServer(t, dir, spirePort, spireBE, oursBEPort, p)
	s.waitOurBundle(true)
	want := s.mustCLI("bundle show", "-format", "pem")
	eventually(t, 30*time.Second, "our workload receives SPIRE's bundle", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		set, err := workloadapi.FetchX509Bundles(ctx, ours.addr())
		if err != nil {
			return err
		}
		b, ok := set.Get(spireTD)
		if !ok {
			return fmt.Errorf("no spire.test bundle")
		}
		if got := string(pemOf(b.X509Authorities())); got != want {
			return fmt.Errorf("spire.test bundle differs from SPIRE's own:\n%s\nwant\n%s", got, want)
		}
		return nil
	})
	s.startAgent()
	mtlsBothWays(t, ours, s)
}

func spireAuthorities(t *testing.T, set *x509bundle.Set) int {
	t.Helper()
	b, ok := set.Get(spireTD)
	if !ok {
		t.Fatal("the stream lost spire.test's bundle")
	}
	return len(b.X509Authorities())
}

type bundleWatcher chan *x509bundle.Set

func (w bundleWatcher) OnX509BundlesUpdate(s *x509bundle.Set) { w <- s }
func (bundleWatcher) OnX509BundlesWatchError(error)           {}

// mtlsBothWays runs an mTLS handshake between our workload and SPIRE's,
// each as server once, each verifying the other's X.509-SVID against the
// federated bundle its own agent served it.
func mtlsBothWays(t *testing.T, ours *ourAgent, s *spireDeployment) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fetch := func(addr workloadapi.ClientOption) *workloadapi.X509Context {
		x, err := workloadapi.FetchX509Context(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	o, sp := fetch(ours.addr()), fetch(workloadapi.WithAddr("unix://"+s.agentSocket))
	for _, dir := range []struct {
		name           string
		server, client *workloadapi.X509Context
		serverID       spiffeid.ID
		clientID       spiffeid.ID
	}{
		{"our workload serves SPIRE's", o, sp, oursWL, spireWL},
		{"SPIRE's workload serves ours", sp, o, spireWL, oursWL},
	} {
		serverSVID, clientSVID := dir.server.DefaultSVID(), dir.client.DefaultSVID()
		if serverSVID.ID != dir.serverID || clientSVID.ID != dir.clientID {
			t.Fatalf("%s: SVIDs %s and %s", dir.name, serverSVID.ID, clientSVID.ID)
		}
		ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(serverSVID, dir.server.Bundles, tlsconfig.AuthorizeID(dir.clientID)))
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				served <- err
				return
			}
			defer conn.Close()
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err == nil {
				_, err = fmt.Fprintf(conn, "hello %s", line)
			}
			served <- err
		}()
		conn, err := tls.Dial("tcp", ln.Addr().String(), tlsconfig.MTLSClientConfig(clientSVID, dir.client.Bundles, tlsconfig.AuthorizeID(dir.serverID)))
		if err != nil {
			ln.Close()
			t.Fatalf("%s: handshake: %v", dir.name, err)
		}
		fmt.Fprintf(conn, "%s\n", dir.clientID)
		reply, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		ln.Close()
		if err != nil || reply != "hello "+dir.clientID.String()+"\n" {
			t.Fatalf("%s: reply %q, %v", dir.name, reply, err)
		}
		if err := <-served; err != nil {
			t.Fatalf("%s: server side: %v", dir.name, err)
		}
	}
}

// jwtBothWays validates a JWT-SVID of each side on the other: through the
// other agent's ValidateJWTSVID, and locally against the JWT bundles the
// other agent serves.
func jwtBothWays(t *testing.T, ours *ourAgent, s *spireDeployment) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spireAddr := workloadapi.WithAddr("unix://" + s.agentSocket)
	for _, dir := range []struct {
		name           string
		issuer, verify workloadapi.ClientOption
		id             spiffeid.ID
	}{
		{"SPIRE's token validates on our side", spireAddr, ours.addr(), spireWL},
		{"our token validates on SPIRE's side", ours.addr(), spireAddr, oursWL},
	} {
		const audience = "csi-agent-spire-interop"
		tok, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience}, dir.issuer)
		if err != nil {
			t.Fatalf("%s: fetch: %v", dir.name, err)
		}
		got, err := workloadapi.ValidateJWTSVID(ctx, tok.Marshal(), audience, dir.verify)
		if err != nil || got.ID != dir.id {
			t.Fatalf("%s: ValidateJWTSVID: %v, %v", dir.name, got, err)
		}
		bundles, err := workloadapi.FetchJWTBundles(ctx, dir.verify)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := jwtsvid.ParseAndValidate(tok.Marshal(), bundles, []string{audience}); err != nil {
			t.Fatalf("%s: against the served JWT bundles: %v", dir.name, err)
		}
	}
}

// shortTempDir keeps socket paths under the 107 bytes Unix allows.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "spire-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
