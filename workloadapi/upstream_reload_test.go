package workloadapi

import (
	"context"
	"crypto/x509"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// An open X.509 stream receives the new bundle when the upstream CA Secret
// is swapped the way kubelet does it, without restarting the agent.
func TestUpstreamSecretSwapReachesOpenStream(t *testing.T) {
	readSecret := func(files [2]string) (map[string][]byte, *x509.Certificate) {
		t.Helper()
		crt, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		key, err := os.ReadFile(files[1])
		if err != nil {
			t.Fatal(err)
		}
		certs, err := x509bundle.Parse(spiffeid.RequireTrustDomainFromString("example.org"), crt)
		if err != nil {
			t.Fatal(err)
		}
		return map[string][]byte{"tls.crt": crt, "tls.key": key}, certs.X509Authorities()[0]
	}
	secret1, ca1 := readSecret(writeUpstreamCA(t))
	secret2, ca2 := readSecret(writeUpstreamCA(t))
	vol := testutil.NewVolume(t, secret1)
	a := startAgent(t, agentConfig{svids: defaultSVIDs(), upstream: [2]string{vol.Path("tls.crt"), vol.Path("tls.key")}})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := rawClient(t, a.socket).FetchX509SVID(withHeader(ctx), &workloadpb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recv := func() (*x509svid.SVID, []*x509.Certificate) {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Svids) != 1 {
			t.Fatalf("got %d SVIDs, want 1", len(resp.Svids))
		}
		s := resp.Svids[0]
		svid, err := x509svid.ParseRaw(s.X509Svid, s.X509SvidKey)
		if err != nil {
			t.Fatal(err)
		}
		roots, err := x509.ParseCertificates(s.Bundle)
		if err != nil {
			t.Fatal(err)
		}
		return svid, roots
	}
	has := func(roots []*x509.Certificate, c *x509.Certificate) bool {
		for _, r := range roots {
			if r.Equal(c) {
				return true
			}
		}
		return false
	}

	_, roots := recv()
	if len(roots) != 1 || !has(roots, ca1) {
		t.Fatalf("bundle before the swap has %d roots, want the first CA only", len(roots))
	}

	vol.Publish(secret2)
	svid, roots := recv() // within a poll of the files
	if len(roots) != 2 || !has(roots, ca2) || !has(roots, ca1) {
		t.Fatalf("bundle after the swap has %d roots, want the new CA and the old one", len(roots))
	}
	// The SVID the stream holds still verifies with the bundle it came with.
	verifyX509(t, svid, x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("example.org"), roots))
	// And new SVIDs chain to the new CA alone.
	fresh, err := a.authority.MintX509SVID(ctx, svid.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	verifyX509(t, fresh, x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("example.org"), []*x509.Certificate{ca2}))
}
