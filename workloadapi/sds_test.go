package workloadapi

import (
	"bytes"
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// envoyNode is the node an Envoy 1.30 names itself with.
var envoyNode = &corev3.Node{Id: "envoy", UserAgentName: "envoy", UserAgentVersionType: &corev3.Node_UserAgentBuildVersion{
	UserAgentBuildVersion: &corev3.BuildVersion{Version: &typev3.SemanticVersion{MajorNumber: 1, MinorNumber: 30}},
}}

// sdsClient dials the socket as Envoy does: plain gRPC, no security header.
func sdsClient(t testing.TB, socket string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := dialRaw(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

func secretsOf(t *testing.T, resp *discoveryv3.DiscoveryResponse) []*tlsv3.Secret {
	t.Helper()
	if resp.TypeUrl != secretTypeURL {
		t.Fatalf("type URL %q, want %q", resp.TypeUrl, secretTypeURL)
	}
	out := make([]*tlsv3.Secret, len(resp.Resources))
	for i, r := range resp.Resources {
		out[i] = &tlsv3.Secret{}
		if err := r.UnmarshalTo(out[i]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func pemDER(t *testing.T, data []byte, typ string) []byte {
	t.Helper()
	var der []byte
	for len(bytes.TrimSpace(data)) > 0 {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil || b.Type != typ {
			t.Fatalf("not a sequence of PEM %s blocks", typ)
		}
		der = append(der, b.Bytes...)
	}
	return der
}

// svidOf parses a TLS certificate secret as an X.509-SVID: chain and key
// must match, and the chain must verify against bundle.
func svidOf(t *testing.T, s *tlsv3.Secret, bundle *x509bundle.Bundle) *x509svid.SVID {
	t.Helper()
	tc := s.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %q is not a TLS certificate", s.Name)
	}
	svid, err := x509svid.ParseRaw(pemDER(t, tc.CertificateChain.GetInlineBytes(), "CERTIFICATE"), pemDER(t, tc.PrivateKey.GetInlineBytes(), "PRIVATE KEY"))
	if err != nil {
		t.Fatalf("secret %q: %v", s.Name, err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("secret %q does not verify: %v", s.Name, err)
	}
	return svid
}

// validatorOf returns the PEM bundles of a SPIFFE certificate validator
// secret, by trust domain name, in order.
func validatorOf(t *testing.T, s *tlsv3.Secret) (names []string, pems [][]byte) {
	t.Helper()
	cv := s.GetValidationContext().GetCustomValidatorConfig()
	if cv == nil || cv.Name != spiffeValidatorName {
		t.Fatalf("secret %q is no SPIFFE validator: %v", s.Name, s)
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := cv.TypedConfig.UnmarshalTo(cfg); err != nil {
		t.Fatal(err)
	}
	for _, td := range cfg.TrustDomains {
		names = append(names, td.Name)
		pems = append(pems, td.TrustBundle.GetInlineBytes())
	}
	return names, pems
}

func bundlePEM(b *spiffebundle.Bundle) []byte { return pemCertificates(b.X509Authorities()) }

// writeBundle writes a's bundle to file as a federation source reads it.
func writeBundle(t *testing.T, a *testAgent, file string) {
	t.Helper()
	data, err := a.authority.Bundle().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

type sdsFixture struct {
	a, other *testAgent
	fedFile  string
	first    spiffeid.ID
	second   spiffeid.ID
}

// startSDSAgent serves two identities to this process and federates with
// other.org, whose bundle it has loaded.
func startSDSAgent(t *testing.T) sdsFixture {
	t.Helper()
	other := startAgent(t, agentConfig{td: "other.org", svids: defaultSVIDs()})
	file := filepath.Join(t.TempDir(), "other.json")
	writeBundle(t, other, file)
	a := startAgent(t, agentConfig{
		svids:      federating([]rules.SVID{uidRule("/first", selfUID()), uidRule("/second", selfUID())}, "other.org"),
		federation: []federation.Source{{TrustDomain: "other.org", Path: file}},
	})
	otherTD := spiffeid.RequireTrustDomainFromString("other.org")
	for deadline := time.Now().Add(5 * time.Second); a.server.federated()[otherTD] == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("federated bundle never loaded")
		}
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	return sdsFixture{a: a, other: other, fedFile: file, first: spiffeid.RequireFromPath(td, "/first"), second: spiffeid.RequireFromPath(td, "/second")}
}

// What each resource name resolves to, the same by FetchSecrets and by the
// first response on StreamSecrets.
func TestSDSResources(t *testing.T) {
	f := startSDSAgent(t)
	own, other := f.a.authority.Bundle(), f.other.authority.Bundle()
	ownX509 := x509bundle.FromX509Authorities(own.TrustDomain(), own.X509Authorities())
	pems := map[string][]byte{"example.org": bundlePEM(own), "other.org": bundlePEM(other)}

	// want describes one secret: an SVID, a SPIFFE validator of trust
	// domains, or trusted CAs of one trust domain.
	type want struct {
		name, svid, trustedCA string
		validator             []string
	}
	for _, tc := range []struct {
		desc  string
		names []string
		node  *corev3.Node
		want  []want
		code  codes.Code
	}{
		{desc: "default is the first identity", names: []string{"default"}, want: []want{{name: "default", svid: f.first.String()}}},
		{desc: "by SPIFFE ID", names: []string{f.second.String()}, want: []want{{name: f.second.String(), svid: f.second.String()}}},
		{desc: "ROOTCA for Envoy is a SPIFFE validator", names: []string{"ROOTCA"}, node: envoyNode, want: []want{{name: "ROOTCA", validator: []string{"example.org"}}}},
		{desc: "ROOTCA for an unversioned client is trusted CAs", names: []string{"ROOTCA"}, want: []want{{name: "ROOTCA", trustedCA: "example.org"}}},
		{desc: "ALL is every bundle", names: []string{"ALL"}, want: []want{{name: "ALL", validator: []string{"example.org", "other.org"}}}},
		{desc: "ALL is a SPIFFE validator for Envoy as well", names: []string{"ALL"}, node: envoyNode, want: []want{{name: "ALL", validator: []string{"example.org", "other.org"}}}},
		{desc: "own trust domain by ID", names: []string{"spiffe://example.org"}, node: envoyNode, want: []want{{name: "spiffe://example.org", validator: []string{"example.org"}}}},
		{desc: "federated by ID", names: []string{"spiffe://other.org"}, node: envoyNode, want: []want{{name: "spiffe://other.org", validator: []string{"other.org"}}}},
		{desc: "federated by name, trusted CAs", names: []string{"other.org"}, want: []want{{name: "other.org", trustedCA: "other.org"}}},
		{desc: "several, in request order, once each", names: []string{"ROOTCA", "default", "ROOTCA", f.first.String()}, node: envoyNode, want: []want{
			{name: "ROOTCA", validator: []string{"example.org"}}, {name: "default", svid: f.first.String()}, {name: f.first.String(), svid: f.first.String()},
		}},
		{desc: "no names is everything", node: envoyNode, want: []want{
			{name: "spiffe://example.org", validator: []string{"example.org"}}, {name: "spiffe://other.org", validator: []string{"other.org"}},
			{name: f.first.String(), svid: f.first.String()}, {name: f.second.String(), svid: f.second.String()},
		}},
		{desc: "an identity not held", names: []string{"default", "spiffe://example.org/someone-else"}, code: codes.InvalidArgument},
		{desc: "an unknown trust domain", names: []string{"spiffe://nowhere.org"}, code: codes.InvalidArgument},
		{desc: "a misspelt default", names: []string{"Default"}, code: codes.InvalidArgument},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			check := func(t *testing.T, resp *discoveryv3.DiscoveryResponse) {
				got := secretsOf(t, resp)
				if len(got) != len(tc.want) {
					t.Fatalf("got %d secrets, want %d: %v", len(got), len(tc.want), got)
				}
				for i, w := range tc.want {
					s := got[i]
					if s.Name != w.name {
						t.Fatalf("secret %d is named %q, want %q", i, s.Name, w.name)
					}
					switch {
					case w.svid != "":
						if id := svidOf(t, s, ownX509).ID.String(); id != w.svid {
							t.Fatalf("secret %q holds %s, want %s", s.Name, id, w.svid)
						}
					case w.trustedCA != "":
						if ca := s.GetValidationContext().GetTrustedCa().GetInlineBytes(); !bytes.Equal(ca, pems[w.trustedCA]) {
							t.Fatalf("secret %q trusts other CAs than %s's", s.Name, w.trustedCA)
						}
					default:
						names, bundles := validatorOf(t, s)
						if !slices.Equal(names, w.validator) {
							t.Fatalf("secret %q validates trust domains %v, want %v", s.Name, names, w.validator)
						}
						for j, n := range names {
							if !bytes.Equal(bundles[j], pems[n]) {
								t.Fatalf("secret %q: wrong bundle for %s", s.Name, n)
							}
						}
					}
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c := sdsClient(t, f.a.socket)
			req := &discoveryv3.DiscoveryRequest{Node: tc.node, TypeUrl: secretTypeURL, ResourceNames: tc.names}

			resp, err := c.FetchSecrets(ctx, req)
			if status.Code(err) != tc.code {
				t.Fatalf("FetchSecrets: %v, want code %v", err, tc.code)
			}
			if err == nil {
				if resp.VersionInfo != "" || resp.Nonce != "" {
					t.Fatalf("FetchSecrets answered with version %q nonce %q, want neither", resp.VersionInfo, resp.Nonce)
				}
				check(t, resp)
			}

			stream, err := c.StreamSecrets(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
			resp, err = stream.Recv()
			if status.Code(err) != tc.code {
				t.Fatalf("StreamSecrets: %v, want code %v", err, tc.code)
			}
			if err == nil {
				if resp.VersionInfo == "" || resp.Nonce == "" {
					t.Fatal("stream response without version or nonce")
				}
				check(t, resp)
			}
		})
	}
}

// A stream of the federated bundle is sent the bundle the federation source
// now holds.
func TestSDSFederatedBundleChangePushed(t *testing.T) {
	f := startSDSAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := sdsClient(t, f.a.socket).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode, ResourceNames: []string{"spiffe://other.org"}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode, ResourceNames: []string{"spiffe://other.org"}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce}); err != nil {
		t.Fatal(err)
	}
	third := startAgent(t, agentConfig{td: "other.org", svids: defaultSVIDs()})
	writeBundle(t, third, f.fedFile)
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if next.VersionInfo == resp.VersionInfo {
		t.Fatal("an update kept the version of the previous response")
	}
	_, pems := validatorOf(t, secretsOf(t, next)[0])
	if !bytes.Equal(pems[0], bundlePEM(third.authority.Bundle())) {
		t.Fatal("the update does not carry the reloaded bundle")
	}
}

// The xDS flow as Envoy runs it: an ACK or a NACK is not answered, a
// rotation is pushed with a new version, a stale request is ignored, a
// request naming other resources is answered.
func TestSDSStreamAckNackRotation(t *testing.T) {
	h := startHolderAgent(t, []rules.SVID{uidRule("/w", selfUID())})
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	// Minted up front: the stream's own first mint would wake it once more.
	if _, _, err := h.cache.X509SVID(context.Background(), id, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := sdsClient(t, h.socket).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	resps, errs := make(chan *discoveryv3.DiscoveryResponse, 8), make(chan error, 1)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				errs <- err
				return
			}
			resps <- resp
		}
	}()
	sentNode := false
	send := func(req *discoveryv3.DiscoveryRequest) {
		t.Helper()
		// Envoy may name its node in the first request only.
		if req.TypeUrl = secretTypeURL; !sentNode {
			req.Node, sentNode = envoyNode, true
		}
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	recv := func() *discoveryv3.DiscoveryResponse {
		t.Helper()
		select {
		case resp := <-resps:
			return resp
		case err := <-errs:
			t.Fatalf("stream ended: %v", err)
		case <-ctx.Done():
			t.Fatal("no response")
		}
		return nil
	}
	quiet := func(what string) {
		t.Helper()
		select {
		case resp := <-resps:
			t.Fatalf("%s was answered: version %s", what, resp.VersionInfo)
		case err := <-errs:
			t.Fatalf("%s ended the stream: %v", what, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	serial := func(resp *discoveryv3.DiscoveryResponse) string {
		t.Helper()
		s := secretsOf(t, resp)[0]
		b := h.srv.bundle.Bundle()
		return svidOf(t, s, x509bundle.FromX509Authorities(b.TrustDomain(), b.X509Authorities())).Certificates[0].SerialNumber.String()
	}

	names := []string{"default"}
	send(&discoveryv3.DiscoveryRequest{ResourceNames: names})
	first := recv()
	firstSerial := serial(first)
	send(&discoveryv3.DiscoveryRequest{ResourceNames: names, VersionInfo: first.VersionInfo, ResponseNonce: first.Nonce})
	quiet("an ACK")
	send(&discoveryv3.DiscoveryRequest{ResourceNames: names, VersionInfo: first.VersionInfo, ResponseNonce: first.Nonce,
		ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: "test: rejected"}})
	quiet("a NACK")

	// Past half life: the renewal reaches the stream.
	h.clock.Step(31 * time.Minute)
	if _, minted, err := h.cache.X509SVID(context.Background(), id, nil); err != nil || !minted {
		t.Fatalf("renewing: minted %v, %v", minted, err)
	}
	rotated := recv()
	if serial(rotated) == firstSerial {
		t.Fatal("the push after a rotation carries the old SVID")
	}
	if rotated.VersionInfo == first.VersionInfo || rotated.Nonce == first.Nonce {
		t.Fatal("the push after a rotation reuses version or nonce")
	}

	names = []string{"default", "ROOTCA"}
	send(&discoveryv3.DiscoveryRequest{ResourceNames: names, VersionInfo: first.VersionInfo, ResponseNonce: first.Nonce})
	quiet("a stale request")
	send(&discoveryv3.DiscoveryRequest{ResourceNames: names, VersionInfo: rotated.VersionInfo, ResponseNonce: rotated.Nonce})
	both := recv()
	got := secretsOf(t, both)
	if len(got) != 2 || got[0].Name != "default" || got[1].Name != "ROOTCA" {
		t.Fatalf("after asking for default and ROOTCA got %v", got)
	}
	if tds, _ := validatorOf(t, got[1]); !slices.Equal(tds, []string{"example.org"}) {
		t.Fatalf("ROOTCA validates %v, want example.org (the node of the first request is Envoy's)", tds)
	}
	if serial(both) != serial(rotated) {
		t.Fatal("asking for more resources changed the SVID")
	}
}

// Callers without an identity get nothing, bundles included. (A stream
// ending once its caller loses its identity: TestStreamEndsWhenEntitlementIsLost.)
func TestSDSPermission(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	t.Run("no identity", func(t *testing.T) {
		a := startAgent(t, agentConfig{svids: []rules.SVID{uidRule("/other", "12345")}})
		c := sdsClient(t, a.socket)
		for _, names := range [][]string{{"default"}, {"ROOTCA"}} {
			req := &discoveryv3.DiscoveryRequest{ResourceNames: names}
			if _, err := c.FetchSecrets(ctx, req); status.Code(err) != codes.PermissionDenied {
				t.Fatalf("FetchSecrets %v: %v, want PermissionDenied", names, err)
			}
			stream, err := c.StreamSecrets(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); status.Code(err) != codes.PermissionDenied {
				t.Fatalf("StreamSecrets %v: %v, want PermissionDenied", names, err)
			}
		}
	})
}

func TestSDSRefusedRequests(t *testing.T) {
	a := startAgent(t, agentConfig{svids: defaultSVIDs()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := sdsClient(t, a.socket)
	wrongType := &discoveryv3.DiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster", ResourceNames: []string{"default"}}
	if _, err := c.FetchSecrets(ctx, wrongType); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchSecrets of clusters: %v, want InvalidArgument", err)
	}
	stream, err := c.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(wrongType); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("StreamSecrets of clusters: %v, want InvalidArgument", err)
	}
	delta, err := c.DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := delta.Recv(); status.Code(err) != codes.Unimplemented {
		t.Fatalf("DeltaSecrets: %v, want Unimplemented", err)
	}
}

// grpcurl's view of the socket: every service is listed and described.
func TestReflection(t *testing.T) {
	h := startHolderAgent(t, defaultSVIDs())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := dialRaw(h.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
		t.Helper()
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	var listed []string
	for _, s := range ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}).GetListServicesResponse().GetService() {
		listed = append(listed, s.Name)
	}
	for _, svc := range []string{"SpiffeWorkloadAPI", "envoy.service.secret.v3.SecretDiscoveryService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !slices.Contains(listed, svc) {
			t.Errorf("reflection lists %v, missing %s", listed, svc)
		}
		resp := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: svc}})
		found := false
		for _, raw := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
			fd := &descriptorpb.FileDescriptorProto{}
			if err := proto.Unmarshal(raw, fd); err != nil {
				t.Fatal(err)
			}
			for _, s := range fd.Service {
				found = found || fd.GetPackage() == "" && s.GetName() == svc || fd.GetPackage()+"."+s.GetName() == svc
			}
		}
		if !found {
			t.Errorf("reflection does not describe %s: %v", svc, resp.GetErrorResponse())
		}
	}
}

// Resource names come from the workload: any name resolves to a resource
// named as asked, of the caller's own, or fails with InvalidArgument.
func FuzzSelectSecrets(f *testing.F) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	fed := []spiffeid.TrustDomain{spiffeid.RequireTrustDomainFromString("other.org")}
	ids := []rules.Identity{{ID: spiffeid.RequireFromPath(td, "/first")}, {ID: spiffeid.RequireFromPath(td, "/second")}}
	for _, seed := range []string{"default", "ROOTCA", "ALL", "", "example.org", "spiffe://example.org", "other.org", "spiffe://other.org",
		"spiffe://example.org/first", "spiffe://example.org/first/", "spiffe://example.org/third", "SPIFFE://EXAMPLE.ORG", "spiffe://nowhere.org", "spiffe:/example.org", "default\x00"} {
		f.Add(seed, "ROOTCA")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		picks, err := selectSecrets([]string{a, b}, ids, td, fed)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument || picks != nil {
				t.Fatalf("%q %q: %v with %v", a, b, err, picks)
			}
			return
		}
		for _, p := range picks {
			if (a != "" || b != "") && p.name != a && p.name != b {
				t.Fatalf("asked for %q %q, got %q", a, b, p.name)
			}
			switch {
			case p.svid >= 0:
				if p.svid >= len(ids) || p.name != "default" && p.name != ids[p.svid].ID.String() {
					t.Fatalf("%q resolved to identity %d", p.name, p.svid)
				}
			case !p.all:
				if p.td != td && !slices.Contains(fed, p.td) {
					t.Fatalf("%q resolved to a trust domain not served: %v", p.name, p.td)
				}
			}
		}
	})
}
