package workloadapi

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// The resource names Envoy configurations written for SPIRE's agent use.
const (
	// SDSDefaultSVID names the caller's first X.509-SVID as a TLS certificate.
	SDSDefaultSVID = "default"
	// SDSDefaultBundle names our trust domain's bundle as a validation context.
	SDSDefaultBundle = "ROOTCA"
	// SDSAllBundles names every bundle, ours and the federated ones, as one
	// SPIFFE certificate validator.
	SDSAllBundles = "ALL"
)

const (
	secretTypeURL        = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
	spiffeValidatorName  = "envoy.tls.cert_validator.spiffe"
	deltaSDSUnsupported  = "delta SDS is not supported: configure the SDS config source with api_type GRPC"
	sdsUnknownNamesError = "workload is not entitled to the requested resources"
)

// RegisterSDS adds Envoy's Secret Discovery Service (v3) to g. It serves the
// caller's X.509-SVIDs and bundles as SPIRE's agent does, attested like
// every other RPC but without the security header, which Envoy does not send.
func (s *Server) RegisterSDS(g grpc.ServiceRegistrar) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, sdsServer{s: s})
}

type sdsServer struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	s *Server
}

// DeltaSecrets is not served (nor is it by SPIRE); the error says how to
// configure Envoy instead.
func (sdsServer) DeltaSecrets(secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	return status.Error(codes.Unimplemented, deltaSDSUnsupported)
}

// FetchSecrets answers one request, with no version or nonce.
func (d sdsServer) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if err := checkTypeURL(req.GetTypeUrl()); err != nil {
		return nil, err
	}
	c, ids, err := d.s.attestEntitled(ctx)
	if err != nil {
		return nil, err
	}
	resources, err := d.s.secrets(ctx, c, req.GetResourceNames(), req.GetNode(), ids, nil)
	if err != nil {
		return nil, err
	}
	return &discoveryv3.DiscoveryResponse{TypeUrl: secretTypeURL, Resources: resources}, nil
}

// StreamSecrets serves the resources the last request named: at once, then
// whenever one of them changes (an SVID rotates, a bundle changes, the rules
// change). Each change, and each request naming other resources, re-attests
// the caller; the stream ends when it is no longer entitled.
func (d sdsServer) StreamSecrets(stream secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	s := d.s
	ctx := stream.Context()
	// Subscribed before anything is read, so that no change slips between.
	sub := s.svids.Subscribe()
	defer sub.Close()

	reqs, recvErr := make(chan *discoveryv3.DiscoveryRequest), make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()

	var (
		st               sdsStreamState
		last             []*anypb.Any
		rulesCh, fedCh   = s.rulesChanged(), s.federationChanged()
		pid              int32
		subscriptionSent bool // the last request's names were answered
	)
	for {
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil // the client is done asking
			}
			return err
		case req := <-reqs:
			if err := checkTypeURL(req.GetTypeUrl()); err != nil {
				return err
			}
			if !st.receive(req, pid) {
				continue // an ACK, a NACK or a stale request: nothing to send
			}
			subscriptionSent = false
		case <-sub.C():
		case <-rulesCh:
		case <-fedCh:
		}
		// Read again before anything else, so that no change slips between.
		rulesCh, fedCh = s.rulesChanged(), s.federationChanged()
		if st.req == nil {
			continue // nothing asked for yet
		}
		c, ids, err := s.attestEntitled(ctx)
		if err != nil {
			if st.sent > 0 {
				klog.InfoS("SDS secrets revoked for caller; stream ended", "pid", pid, "err", err)
			}
			return err
		}
		pid = c.pid
		// What this stream serves, and only that, wakes it when renewed.
		resources, err := s.secrets(ctx, c, st.req.GetResourceNames(), st.node, ids, sub)
		if err != nil {
			return err
		}
		if subscriptionSent && sameResources(last, resources) {
			continue
		}
		resp := st.next(resources)
		if err := stream.Send(resp); err != nil {
			return err
		}
		last, subscriptionSent = resources, true
		klog.V(1).InfoS("Sent SDS secrets", "pid", pid, "resources", len(resources), "version", resp.VersionInfo)
	}
}

// sdsStreamState is the xDS bookkeeping of one stream: the request being
// served and the version and nonce of the last response.
type sdsStreamState struct {
	req *discoveryv3.DiscoveryRequest
	// node is the client as it last named itself; Envoy may name itself in
	// the first request only.
	node *corev3.Node
	sent uint64 // responses sent; the last one's version and nonce
}

// receive takes a request and reports whether it asks for other resources
// than those being served, which calls for a response. A request that echoes
// the last nonce acknowledges it (ACK) or, with error detail, rejects it
// (NACK: Envoy keeps the secrets it had, we keep serving and log); one with
// an older nonce is stale and ignored, as the xDS protocol asks.
func (st *sdsStreamState) receive(req *discoveryv3.DiscoveryRequest, pid int32) bool {
	if req.GetNode() != nil {
		st.node = req.GetNode()
	}
	if st.sent > 0 {
		if req.GetResponseNonce() != st.nonce() {
			klog.V(1).InfoS("Ignoring stale SDS request", "pid", pid, "nonce", req.GetResponseNonce(), "expected", st.nonce())
			return false
		}
		if e := req.GetErrorDetail(); e != nil {
			klog.ErrorS(errors.New(e.GetMessage()), "Envoy rejected SDS secrets", "pid", pid, "version", st.nonce(), "resources", req.GetResourceNames())
		} else {
			klog.V(2).InfoS("Envoy applied SDS secrets", "pid", pid, "version", req.GetVersionInfo())
		}
	}
	changed := st.req == nil || !sameNames(st.req.GetResourceNames(), req.GetResourceNames())
	if changed {
		st.req = req
	}
	return changed
}

// next makes the response carrying resources; each has a new version, used
// as its nonce too.
func (st *sdsStreamState) next(resources []*anypb.Any) *discoveryv3.DiscoveryResponse {
	st.sent++
	return &discoveryv3.DiscoveryResponse{TypeUrl: secretTypeURL, VersionInfo: st.nonce(), Nonce: st.nonce(), Resources: resources}
}

func (st *sdsStreamState) nonce() string { return strconv.FormatUint(st.sent, 10) }

func checkTypeURL(u string) error {
	if u != "" && u != secretTypeURL {
		return status.Errorf(codes.InvalidArgument, "this service serves %s, not %s", secretTypeURL, u)
	}
	return nil
}

func (s *Server) attestEntitled(ctx context.Context) (caller, []rules.Identity, error) {
	c, err := s.attestPeer(ctx)
	if err != nil {
		return caller{}, nil, err
	}
	ids, err := s.entitled(c)
	return c, ids, err
}

// secrets builds the named resources for a caller holding ids, in the form
// node reads, minting the SVIDs among them. Before it reads those it makes
// sub, if not nil, watch them, and reads them through it.
func (s *Server) secrets(ctx context.Context, c caller, names []string, node *corev3.Node, ids []rules.Identity, sub *svidcache.Subscription) ([]*anypb.Any, error) {
	fed := s.federatedFor(ids) // and so ALL, and a trust domain by name
	picks, err := selectSecrets(names, ids, s.td, slices.Collect(maps.Keys(fed)))
	if err != nil {
		return nil, err
	}
	fetch := s.svids.X509SVID
	if sub != nil {
		fetch = sub.X509SVID
		var keys []svidcache.X509Key
		for _, p := range picks {
			if p.svid >= 0 {
				keys = append(keys, svidcache.X509Key{ID: ids[p.svid].ID, DNSNames: ids[p.svid].DNSNames})
			}
		}
		sub.Watch(keys)
	}
	bundles := map[spiffeid.TrustDomain]*spiffebundle.Bundle{s.td: s.bundle.Bundle()}
	maps.Copy(bundles, fed)
	spiffeForm := supportsSPIFFEValidator(node)

	out := make([]*anypb.Any, 0, len(picks))
	for _, p := range picks {
		var secret *tlsv3.Secret
		switch {
		case p.svid >= 0:
			if secret, err = s.tlsCertificate(ctx, c, p.name, ids[p.svid], fetch); err != nil {
				return nil, err
			}
		case p.all:
			secret = spiffeValidator(p.name, bundles)
		case spiffeForm:
			secret = spiffeValidator(p.name, map[spiffeid.TrustDomain]*spiffebundle.Bundle{p.td: bundles[p.td]})
		default:
			secret = trustedCA(p.name, bundles[p.td])
		}
		a, err := anypb.New(secret)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "encode secret %q: %v", p.name, err)
		}
		out = append(out, a)
	}
	return out, nil
}

// tlsCertificate mints (or takes from the cache) the SVID of id as a TLS
// certificate secret, auditing a mint as the X.509-SVID stream does.
func (s *Server) tlsCertificate(ctx context.Context, c caller, name string, id rules.Identity, fetch x509Fetch) (*tlsv3.Secret, error) {
	svid, minted, err := fetch(ctx, id.ID, id.DNSNames)
	if err != nil {
		klog.ErrorS(err, "Minting X.509-SVID failed", "spiffe_id", id.ID.String())
		return nil, status.Errorf(codes.Unavailable, "could not mint X.509-SVID for %s: %v", id.ID, err)
	}
	enc, err := s.encode(id.ID.String(), id.DNSNames, svid)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode SVID: %v", err)
	}
	if minted {
		iss := enc.issued
		klog.InfoS("Issued X.509-SVID", "spiffe_id", iss.id, "serial", iss.serial, "expires", iss.expires, "pid", c.pid, "attributes", c.attrs.String())
	}
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: inlineBytes(pemCertificates(svid.Certificates)),
		PrivateKey:       inlineBytes(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: enc.key})),
	}}}, nil
}

// spiffeValidator makes bundles a validation context for Envoy's SPIFFE
// certificate validator, which checks each peer against the bundle of the
// peer's own trust domain.
func spiffeValidator(name string, bundles map[spiffeid.TrustDomain]*spiffebundle.Bundle) *tlsv3.Secret {
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	for _, td := range slices.SortedFunc(maps.Keys(bundles), compareTD) {
		cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
			Name:        td.Name(),
			TrustBundle: inlineBytes(pemCertificates(bundles[td].X509Authorities())),
		})
	}
	typed, _ := anypb.New(cfg) // marshalling a well-formed message does not fail
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: spiffeValidatorName, TypedConfig: typed},
	}}}
}

// trustedCA makes a bundle a validation context of trusted CAs, for Envoy
// before 1.18.
func trustedCA(name string, b *spiffebundle.Bundle) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: inlineBytes(pemCertificates(b.X509Authorities())),
	}}}
}

func compareTD(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) }

// supportsSPIFFEValidator tells from the node's build version whether it is
// an Envoy with the SPIFFE certificate validator (1.18 on), as SPIRE does: a
// client that does not say gets trusted CAs, which every version reads.
func supportsSPIFFEValidator(node *corev3.Node) bool {
	v := node.GetUserAgentBuildVersion().GetVersion()
	if v == nil {
		return false
	}
	return v.GetMajorNumber() > 1 || v.GetMajorNumber() == 1 && v.GetMinorNumber() >= 18
}

// secretPick is one resource to send: the SVID at index svid of the
// caller's identities, or the bundle of td, or all bundles.
type secretPick struct {
	name string
	svid int // -1: a bundle
	td   spiffeid.TrustDomain
	all  bool
}

// selectSecrets resolves requested resource names: "default" (the first
// identity's SVID), a SPIFFE ID the caller holds, "ROOTCA" (our bundle),
// "ALL", or a trust domain ("spiffe://td" as SPIRE names it, or "td").
// No (non-empty) names asks for everything, named as SPIRE does: each bundle by trust
// domain ID, each SVID by SPIFFE ID. A name that resolves to nothing fails
// the request with InvalidArgument, as SPIRE's does: it is either a typo or
// an identity the caller does not hold, and Envoy reports the failure.
func selectSecrets(names []string, ids []rules.Identity, own spiffeid.TrustDomain, federated []spiffeid.TrustDomain) ([]secretPick, error) {
	names = slices.DeleteFunc(slices.Clone(names), func(n string) bool { return n == "" }) // as SPIRE: empty names ask for nothing
	if len(names) == 0 {
		tds := append([]spiffeid.TrustDomain{own}, federated...)
		slices.SortFunc(tds[1:], compareTD)
		picks := make([]secretPick, 0, len(tds)+len(ids))
		for _, td := range tds {
			picks = append(picks, secretPick{name: td.IDString(), svid: -1, td: td})
		}
		for i, id := range ids {
			picks = append(picks, secretPick{name: id.ID.String(), svid: i})
		}
		return picks, nil
	}
	var (
		picks   []secretPick
		unknown []string
		seen    = map[string]bool{}
	)
	for _, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		if p, ok := pickSecret(name, ids, own, federated); ok {
			picks = append(picks, p)
		} else {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		return nil, status.Errorf(codes.InvalidArgument, "%s: %q", sdsUnknownNamesError, unknown)
	}
	return picks, nil
}

func pickSecret(name string, ids []rules.Identity, own spiffeid.TrustDomain, federated []spiffeid.TrustDomain) (secretPick, bool) {
	switch name {
	case SDSDefaultSVID:
		return secretPick{name: name, svid: 0}, len(ids) > 0
	case SDSDefaultBundle:
		return secretPick{name: name, svid: -1, td: own}, true
	case SDSAllBundles:
		return secretPick{name: name, svid: -1, all: true}, true
	}
	for i, id := range ids {
		if id.ID.String() == name {
			return secretPick{name: name, svid: i}, true
		}
	}
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil || (name != td.Name() && name != td.IDString()) {
		return secretPick{}, false // a SPIFFE ID with a path, or not canonical
	}
	if td == own || slices.Contains(federated, td) {
		return secretPick{name: name, svid: -1, td: td}, true
	}
	return secretPick{}, false
}

func sameNames(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

func sameResources(a, b []*anypb.Any) bool {
	return slices.EqualFunc(a, b, func(x, y *anypb.Any) bool { return proto.Equal(x, y) })
}

func inlineBytes(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

func pemCertificates(certs []*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}
