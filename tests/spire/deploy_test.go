package spire

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// The two trust domains and the identities the test's workloads get.
var (
	spireTD     = spiffeid.RequireTrustDomainFromString("spire.test")
	oursTD      = spiffeid.RequireTrustDomainFromString("csi.test")
	spireServer = spiffeid.RequireFromString("spiffe://spire.test/spire/server")
	oursBE      = spiffeid.RequireFromString("spiffe://csi.test/bundle-endpoint")
	spireWL     = spiffeid.RequireFromString("spiffe://spire.test/workload")
	oursWL      = spiffeid.RequireFromString("spiffe://csi.test/workload")
)

// profile is how one side serves its bundle endpoint and how the other
// side reaches it.
type profile struct {
	name string // https_spiffe or https_web
	// https_web: the test CA that signs both serving certificates, and each
	// side's certificate and key.
	caFile              string
	spireCert, spireKey string
	oursCert, oursKey   string
}

// spireDeployment is a SPIRE server (and, once started, an agent) in dir.
type spireDeployment struct {
	t                *testing.T
	dir              string
	socket           string // the server API
	port, bundlePort int
	agentSocket      string
	server           *proc
}

func startSPIREServer(t *testing.T, dir string, port, bundlePort, oursBundlePort int, p profile) *spireDeployment {
	t.Helper()
	s := &spireDeployment{t: t, dir: dir, socket: filepath.Join(dir, "server.sock"), port: port, bundlePort: bundlePort,
		agentSocket: filepath.Join(dir, "agent.sock")}
	endpointProfile := `profile "https_spiffe" {}`
	peerProfile := fmt.Sprintf(`bundle_endpoint_profile "https_spiffe" { endpoint_spiffe_id = %q }`, oursBE)
	var env []string
	if p.name == "https_web" {
		endpointProfile = fmt.Sprintf(`profile "https_web" { serving_cert_file { cert_file_path = %q
			key_file_path = %q
			file_sync_interval = "1m" } }`, p.spireCert, p.spireKey)
		peerProfile = `bundle_endpoint_profile "https_web" {}`
		// SPIRE's https_web client trusts the system's roots only: point
		// Go's at the test CA.
		env = append(env, "SSL_CERT_FILE="+p.caFile)
	}
	conf := fmt.Sprintf(`
server {
	bind_address = "127.0.0.1"
	bind_port = "%d"
	socket_path = %q
	trust_domain = "spire.test"
	data_dir = %q
	log_level = "DEBUG"
	default_x509_svid_ttl = "1h"
	federation {
		bundle_endpoint {
			address = "127.0.0.1"
			port = %d
			refresh_hint = "1s"
			%s
		}
		federates_with "csi.test" {
			bundle_endpoint_url = "https://127.0.0.1:%d"
			%s
		}
	}
}
plugins {
	DataStore "sql" {
		plugin_data {
			database_type = "sqlite3"
			connection_string = %q
		}
	}
	KeyManager "memory" { plugin_data {} }
	NodeAttestor "join_token" { plugin_data {} }
}
`, port, s.socket, filepath.Join(dir, "server-data"), bundlePort, endpointProfile, oursBundlePort, peerProfile, filepath.Join(dir, "server-data", "datastore.sqlite3"))
	if err := os.MkdirAll(filepath.Join(dir, "server-data"), 0o700); err != nil {
		t.Fatal(err)
	}
	confPath := filepath.Join(dir, "server.conf")
	writeFile(t, confPath, []byte(conf))
	s.server = start(t, dir, "spire-server", env, bins.spireServer, "run", "-config", confPath)
	eventually(t, 60*time.Second, "spire-server healthy", func() error {
		if s.server.exited() {
			t.Fatal("spire-server exited")
		}
		_, err := s.cli("healthcheck")
		return err
	})
	return s
}

func (s *spireDeployment) cli(command string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return spireCLI(ctx, s.socket, command, args...)
}

func (s *spireDeployment) mustCLI(command string, args ...string) string {
	s.t.Helper()
	out, err := s.cli(command, args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// startAgent attests a SPIRE agent with a join token and registers the
// test process (its uid) as spireWL, federating with csi.test.
func (s *spireDeployment) startAgent() {
	t := s.t
	t.Helper()
	out := s.mustCLI("token generate", "-ttl", "600")
	first, _, _ := strings.Cut(out, "\n") // a warning may follow
	token := strings.TrimSpace(strings.TrimPrefix(first, "Token:"))
	if token == "" || strings.ContainsAny(token, " \n") {
		t.Fatalf("token generate said %q", out)
	}
	bundlePEM := filepath.Join(s.dir, "spire-bundle.pem")
	writeFile(t, bundlePEM, []byte(s.mustCLI("bundle show", "-format", "pem")))
	conf := fmt.Sprintf(`
agent {
	data_dir = %q
	log_level = "DEBUG"
	server_address = "127.0.0.1"
	server_port = "%d"
	socket_path = %q
	trust_domain = "spire.test"
	trust_bundle_path = %q
	join_token = %q
}
plugins {
	NodeAttestor "join_token" { plugin_data {} }
	KeyManager "memory" { plugin_data {} }
	WorkloadAttestor "unix" { plugin_data {} }
}
`, filepath.Join(s.dir, "agent-data"), s.port, s.agentSocket, bundlePEM, token)
	confPath := filepath.Join(s.dir, "agent.conf")
	writeFile(t, confPath, []byte(conf))
	s.mustCLI("entry create",
		"-parentID", "spiffe://spire.test/spire/agent/join_token/"+token,
		"-spiffeID", spireWL.String(),
		"-selector", fmt.Sprintf("unix:uid:%d", os.Getuid()),
		"-federatesWith", oursTD.IDString())
	agent := start(t, s.dir, "spire-agent", nil, bins.spireAgent, "run", "-config", confPath)
	eventually(t, 90*time.Second, "the SPIRE workload's X.509-SVID, federated with csi.test", func() error {
		if agent.exited() {
			t.Fatal("spire-agent exited")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		x, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+s.agentSocket))
		if err != nil {
			return err
		}
		if !x.Bundles.Has(oursTD) {
			return errors.New("no csi.test bundle yet")
		}
		return nil
	})
}

// hasOurBundle waits until SPIRE holds csi.test's bundle as served by our
// bundle endpoint: with our JWT key, which a PEM bootstrap lacks.
func (s *spireDeployment) waitOurBundle(wantJWT bool) {
	s.t.Helper()
	eventually(s.t, 60*time.Second, "SPIRE fetched csi.test's bundle from our endpoint", func() error {
		_, _ = s.cli("federation refresh", "-id", oursTD.IDString())
		out, err := s.cli("bundle list", "-id", oursTD.IDString(), "-format", "spiffe")
		if err != nil {
			return err
		}
		if wantJWT && !strings.Contains(out, `"jwt-svid"`) {
			return fmt.Errorf("no JWT authority in %s", out)
		}
		if !strings.Contains(out, `"x509-svid"`) {
			return fmt.Errorf("no X.509 authority in %s", out)
		}
		return nil
	})
}

// ourAgent is csi-agent serving csi.test in dir.
type ourAgent struct {
	socket   string
	stateDir string
	proc     *proc
}

func (a *ourAgent) addr() workloadapi.ClientOption { return workloadapi.WithAddr("unix://" + a.socket) }

// startOurAgent runs csi-agent with unix attestation, a rule giving the
// test's uid oursWL federating with spire.test, its bundle endpoint on
// bundlePort and spire.test's bundle endpoint as a federation source.
func startOurAgent(t *testing.T, dir string, bundlePort, spireBundlePort int, p profile, spireInitial string) *ourAgent {
	t.Helper()
	a := &ourAgent{socket: filepath.Join(dir, "sock", "agent.sock"), stateDir: filepath.Join(dir, "state")}
	endpoint := fmt.Sprintf("{address: '127.0.0.1:%d', profile: https_spiffe, spiffeID: %s}", bundlePort, oursBE.Path())
	source := fmt.Sprintf("{trustDomain: spire.test, path: %q, bundleEndpoint: {url: 'https://127.0.0.1:%d', profile: https_spiffe, spiffeID: %q}}", spireInitial, spireBundlePort, spireServer)
	if p.name == "https_web" {
		endpoint = fmt.Sprintf("{address: '127.0.0.1:%d', profile: https_web, certFile: %q, keyFile: %q}", bundlePort, p.oursCert, p.oursKey)
		source = fmt.Sprintf("{trustDomain: spire.test, bundleEndpoint: {url: 'https://127.0.0.1:%d', profile: https_web, caFile: %q}}", spireBundlePort, p.caFile)
	}
	conf := fmt.Sprintf(`trustDomain: csi.test
stateDir: %s
workloadAPI: {socketDir: %s}
bundleEndpoint: %s
federationRefresh: {min: 1s, max: 5s}
federation:
  - %s
svids:
  - spiffeID: %s
    federatesWith: [spire.test]
    rules:
      - match: {unix.uid: "%d"}
`, a.stateDir, filepath.Dir(a.socket), endpoint, source, oursWL.Path(), os.Getuid())
	confPath := filepath.Join(dir, "csi-agent.yaml")
	writeFile(t, confPath, []byte(conf))
	a.proc = start(t, dir, "csi-agent", nil, bins.csiAgent, "run", "--config", confPath, "-v=1")
	eventually(t, 30*time.Second, "csi-agent serving", func() error {
		if a.proc.exited() {
			t.Fatal("csi-agent exited")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := workloadapi.FetchX509SVID(ctx, a.addr())
		return err
	})
	return a
}

// ourBundlePEM is csi.test's X.509 bundle as our Workload API serves it:
// how an operator bootstraps SPIRE (csi-agent fetch bundles --out).
func (a *ourAgent) ourBundlePEM(t *testing.T) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	set, err := workloadapi.FetchX509Bundles(ctx, a.addr())
	if err != nil {
		t.Fatal(err)
	}
	b, ok := set.Get(oursTD)
	if !ok {
		t.Fatal("our own bundle missing")
	}
	return pemOf(b.X509Authorities())
}

func pemOf(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
