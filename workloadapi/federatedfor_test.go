package workloadapi

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// federating makes every SVID of svids federate with tds.
func federating(svids []rules.SVID, tds ...string) []rules.SVID {
	out := slices.Clone(svids)
	for i := range out {
		out[i].FederatesWith = tds
	}
	return out
}

// A caller receives the federated bundles of the SVIDs it holds, and only
// those: in X.509-SVID responses, both bundle streams, JWT validation and
// SDS, and it loses them when the rules stop federating.
func TestFederatedBundlesOnlyForFederatingSVIDs(t *testing.T) {
	other := startAgent(t, agentConfig{td: "other.org", svids: defaultSVIDs()})
	third := startAgent(t, agentConfig{td: "third.org", svids: defaultSVIDs()})
	dir := t.TempDir()
	otherFile, thirdFile := filepath.Join(dir, "other.json"), filepath.Join(dir, "third.json")
	writeBundle(t, other, otherFile)
	writeBundle(t, third, thirdFile)
	uid := selfUID()
	a := startAgent(t, agentConfig{
		// Two SVIDs for this caller: the union of what they federate with counts.
		svids: []rules.SVID{uidRule("/plain", uid), federating([]rules.SVID{uidRule("/partner", uid)}, "other.org")[0]},
		federation: []federation.Source{
			{TrustDomain: "other.org", Path: otherFile},
			{TrustDomain: "third.org", Path: thirdFile},
		},
	})
	otherTD, thirdTD := spiffeid.RequireTrustDomainFromString("other.org"), spiffeid.RequireTrustDomainFromString("third.org")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if !x509ctx.Bundles.Has(otherTD) || x509ctx.Bundles.Has(thirdTD) {
		t.Errorf("X.509-SVID response federated bundles = %v, want other.org only", tdNames(x509ctx.Bundles.Bundles()))
	}
	xb, err := workloadapi.FetchX509Bundles(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if !xb.Has(otherTD) || xb.Has(thirdTD) {
		t.Errorf("FetchX509Bundles = %v, want example.org and other.org", tdNames(xb.Bundles()))
	}
	jb, err := workloadapi.FetchJWTBundles(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	if !jb.Has(otherTD) || jb.Has(thirdTD) {
		t.Errorf("FetchJWTBundles holds other.org %v, third.org %v; want true, false", jb.Has(otherTD), jb.Has(thirdTD))
	}
	for _, tc := range []struct {
		from *testAgent
		ok   bool
	}{{other, true}, {third, false}} {
		tok, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "x"}, workloadapi.WithAddr(tc.from.addr()))
		if err != nil {
			t.Fatal(err)
		}
		_, err = workloadapi.ValidateJWTSVID(ctx, tok.Marshal(), "x", workloadapi.WithAddr(a.addr()))
		if (err == nil) != tc.ok {
			t.Errorf("ValidateJWTSVID of a %s token: err = %v, want ok %v", tok.ID.TrustDomain(), err, tc.ok)
		}
	}

	sds := sdsClient(t, a.socket)
	resp, err := sds.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{ResourceNames: []string{SDSAllBundles}, Node: envoyNode})
	if err != nil {
		t.Fatal(err)
	}
	if names, _ := validatorOf(t, secretsOf(t, resp)[0]); !slices.Equal(names, []string{"example.org", "other.org"}) {
		t.Errorf("SDS ALL = %v, want [example.org other.org]", names)
	}
	resp, err = sds.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyNode})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secretsOf(t, resp) {
		if s.Name == thirdTD.IDString() {
			t.Errorf("SDS with no names sent %s", s.Name)
		}
	}
	for _, name := range []string{"third.org", "spiffe://third.org"} {
		_, err := sds.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{ResourceNames: []string{name}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("SDS %q: err = %v, want InvalidArgument", name, err)
		}
	}

	// Rules that stop federating take the bundle from open streams.
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(a.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	updates := make(chan *x509bundle.Set, 8)
	go func() { _ = client.WatchX509Bundles(ctx, bundleWatcher(updates)) }()
	if set := <-updates; !set.Has(otherTD) {
		t.Fatalf("stream = %v, want other.org", tdNames(set.Bundles()))
	}
	set, err := rules.Compile(spiffeid.RequireTrustDomainFromString("example.org"), []rules.SVID{uidRule("/plain", uid)})
	if err != nil {
		t.Fatal(err)
	}
	a.server.SetRules(set)
	select {
	case set := <-updates:
		if set.Has(otherTD) || set.Has(thirdTD) || set.Len() != 1 {
			t.Fatalf("after the rules stopped federating the stream sent %v", tdNames(set.Bundles()))
		}
	case <-ctx.Done():
		t.Fatal("the stream kept the federated bundle after the rules stopped federating")
	}
}

func tdNames(bs []*x509bundle.Bundle) []string {
	var out []string
	for _, b := range bs {
		out = append(out, b.TrustDomain().Name())
	}
	return out
}
