// Package workloadapi serves the SPIFFE Workload API: it attests each caller
// on every RPC, maps the attested facts through the rules to SPIFFE IDs, and
// hands out X.509-SVIDs, JWT-SVIDs and bundles, streaming every change.
package workloadapi

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/svidcache"
	"github.com/csi-agent/csi-agent/internal/peer"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// Attestor establishes the facts about the process with the given PID. It is
// the seam to procfs and the kubelet.
type Attestor interface {
	Attest(ctx context.Context, pid int32) (attestor.Attributes, error)
}

// Options configure a Server.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	Attestor    Attestor
	Rules       *rules.Set
	Authority   *ca.Authority
	Cache       *svidcache.Cache
	// Federation may be nil: no federated bundles.
	Federation *federation.Watcher
}

// Server implements the Workload API.
type Server struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer

	td        spiffeid.TrustDomain
	attestor  Attestor
	authority *ca.Authority
	cache     *svidcache.Cache
	fed       *federation.Watcher

	rules atomic.Pointer[rules.Set]
	ready atomic.Bool

	mu          sync.Mutex
	rulesChange chan struct{}

	// encoded holds each SPIFFE ID's current SVID in wire form, so that a
	// new connection does not re-encode a key the cache has not rotated.
	encMu   sync.RWMutex
	encoded map[string]encodedSVID

	// afterAttest runs between attestation and the PID-reuse check; tests
	// use it to make the caller exit at exactly that point.
	afterAttest atomic.Pointer[func(pid int32)]
}

// New returns a server that answers Unavailable until SetReady(true).
func New(opts Options) (*Server, error) {
	switch {
	case opts.TrustDomain.IsZero():
		return nil, errors.New("workloadapi: trust domain is required")
	case opts.Attestor == nil:
		return nil, errors.New("workloadapi: attestor is required")
	case opts.Rules == nil:
		return nil, errors.New("workloadapi: rules are required")
	case opts.Authority == nil || opts.Cache == nil:
		return nil, errors.New("workloadapi: authority and cache are required")
	}
	s := &Server{
		td:          opts.TrustDomain,
		attestor:    opts.Attestor,
		authority:   opts.Authority,
		cache:       opts.Cache,
		fed:         opts.Federation,
		rulesChange: make(chan struct{}),
		encoded:     map[string]encodedSVID{},
	}
	s.rules.Store(opts.Rules)
	return s, nil
}

// Register adds the Workload API service to g.
func (s *Server) Register(g *grpc.Server) { workloadpb.RegisterSpiffeWorkloadAPIServer(g, s) }

// SetReady switches between serving and answering Unavailable.
func (s *Server) SetReady(ready bool) { s.ready.Store(ready) }

// Ready reports whether the server serves.
func (s *Server) Ready() bool { return s.ready.Load() }

// SetRules swaps the rules (config reload); every open stream re-evaluates.
func (s *Server) SetRules(set *rules.Set) {
	s.rules.Store(set)
	s.mu.Lock()
	close(s.rulesChange)
	s.rulesChange = make(chan struct{})
	s.mu.Unlock()
}

func (s *Server) rulesChanged() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rulesChange
}

// caller is an attested Workload API client.
type caller struct {
	pid   int32
	attrs attestor.Attributes
}

// checkHeader enforces the security header that keeps browsers and other
// SSRF-style proxies from reaching the API.
func checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md.Get("workload.spiffe.io")) != 1 || md.Get("workload.spiffe.io")[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request: set gRPC metadata workload.spiffe.io=true")
	}
	return nil
}

// attest identifies the caller of an RPC. Errors carry gRPC codes.
func (s *Server) attest(ctx context.Context) (caller, error) {
	if err := checkHeader(ctx); err != nil {
		return caller{}, err
	}
	if !s.ready.Load() {
		return caller{}, status.Error(codes.Unavailable, "agent is starting up")
	}
	info, ok := peer.FromContext(ctx)
	if !ok {
		return caller{}, status.Error(codes.Internal, "no peer credentials on this connection")
	}
	if info.PID <= 0 {
		return caller{}, status.Error(codes.PermissionDenied, "caller is outside the agent's PID namespace (the agent needs the host PID namespace)")
	}
	attrs, err := s.attestor.Attest(ctx, info.PID)
	if hook := s.afterAttest.Load(); hook != nil {
		(*hook)(info.PID)
	}
	if err != nil {
		klog.InfoS("Attestation failed", "pid", info.PID, "uid", info.UID, "err", err)
		switch {
		case errors.Is(err, attestor.ErrUnavailable):
			return caller{}, status.Errorf(codes.Unavailable, "attestation unavailable: %v", err)
		case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
			return caller{}, status.FromContextError(err).Err()
		default:
			// Fail closed: whatever went wrong, no identity.
			return caller{}, status.Errorf(codes.PermissionDenied, "attestation failed: %v", err)
		}
	}
	// The kernel recorded the caller's effective ids at connect(); procfs
	// shows them now. A process that exec'd a setuid binary since it
	// connected would otherwise be attested as that binary's owner.
	if err := sameCredentials(info, attrs); err != nil {
		klog.InfoS("Caller's credentials changed since it connected; denied, connection closed", "pid", info.PID, "err", err)
		_ = info.CloseConnection()
		return caller{}, status.Errorf(codes.PermissionDenied, "caller credentials changed since connect: %v", err)
	}
	// Only now that the facts are read do we know whether they were read
	// from the process that connected and not from a successor on its PID.
	if err := info.Alive(); err != nil {
		klog.InfoS("Caller gone before attestation completed; denied, connection closed", "pid", info.PID, "err", err)
		// Whoever still holds the socket is not the process we attested.
		_ = info.CloseConnection()
		return caller{}, status.Error(codes.PermissionDenied, "caller process exited during attestation")
	}
	return caller{pid: info.PID, attrs: attrs}, nil
}

// sameCredentials checks the attested effective uid and gid against those
// the kernel recorded at connect.
func sameCredentials(info peer.Info, attrs attestor.Attributes) error {
	for _, c := range []struct {
		field string
		want  uint32
	}{{"unix.uid", info.UID}, {"unix.gid", info.GID}} {
		got, ok := attrs.Get(c.field)
		if !ok || got != strconv.FormatUint(uint64(c.want), 10) {
			return fmt.Errorf("%s is %q now, %d at connect", c.field, got, c.want)
		}
	}
	return nil
}

// entitled evaluates the rules for an attested caller.
func (s *Server) entitled(c caller) ([]rules.Identity, error) {
	ids := s.rules.Load().Evaluate(c.attrs)
	if len(ids) == 0 {
		klog.V(1).InfoS("No identity for caller", "pid", c.pid, "attributes", c.attrs.String())
		return nil, status.Error(codes.PermissionDenied, "no identity issued: no rule matches this workload")
	}
	return ids, nil
}

// FetchX509SVID streams the caller's X.509-SVIDs: at once, then whenever an
// SVID rotates, a bundle changes or the rules change.
func (s *Server) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream grpc.ServerStreamingServer[workloadpb.X509SVIDResponse]) error {
	ctx := stream.Context()
	var (
		last    *workloadpb.X509SVIDResponse
		audited map[string]bool // serials in the last message, already audited
	)
	for {
		cacheCh, rulesCh, fedCh := s.cache.Changed(), s.rulesChanged(), s.federationChanged()
		// Attest again at every change: a stream must stop the moment its
		// caller is gone or no longer entitled (pod relabelled, volume
		// unpublished, rules reloaded), not keep receiving rotated keys.
		c, err := s.attest(ctx)
		if err != nil {
			return err
		}
		ids, err := s.entitled(c)
		if err != nil {
			if last != nil {
				klog.InfoS("X.509-SVIDs revoked for caller; stream ended", "pid", c.pid, "err", err)
			}
			return err
		}
		resp, issued, err := s.x509Response(ctx, ids)
		if err != nil {
			return err
		}
		if last == nil || !sameX509Response(last, resp) {
			if err := stream.Send(resp); err != nil {
				return err
			}
			now := make(map[string]bool, len(issued))
			for _, iss := range issued {
				now[iss.serial] = true
				if !audited[iss.serial] {
					klog.InfoS("Issued X.509-SVID", "spiffe_id", iss.id, "serial", iss.serial, "expires", iss.expires, "pid", c.pid, "attributes", c.attrs.String())
				}
			}
			last, audited = resp, now
		}
		select {
		case <-ctx.Done():
			return nil
		case <-cacheCh:
		case <-rulesCh:
		case <-fedCh:
		}
	}
}

type issuedSVID struct {
	id, serial, expires string
}

func (s *Server) x509Response(ctx context.Context, ids []rules.Identity) (*workloadpb.X509SVIDResponse, []issuedSVID, error) {
	own := s.authority.Bundle()
	ownDER := concatDER(own.X509Authorities())
	resp := &workloadpb.X509SVIDResponse{Svids: make([]*workloadpb.X509SVID, 0, len(ids))}
	issued := make([]issuedSVID, 0, len(ids))
	for _, id := range ids {
		svid, err := s.cache.X509SVID(ctx, id.ID, id.DNSNames)
		if err != nil {
			klog.ErrorS(err, "Minting X.509-SVID failed", "spiffe_id", id.ID.String())
			return nil, nil, status.Errorf(codes.Unavailable, "could not mint X.509-SVID for %s: %v", id.ID, err)
		}
		enc, err := s.encode(id.ID.String(), id.DNSNames, svid)
		if err != nil {
			return nil, nil, status.Errorf(codes.Internal, "encode SVID: %v", err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.X509SVID{
			SpiffeId:    id.ID.String(),
			X509Svid:    enc.chain,
			X509SvidKey: enc.key,
			Bundle:      ownDER,
			Hint:        id.Hint,
		})
		issued = append(issued, enc.issued)
	}
	resp.FederatedBundles = s.federatedX509()
	return resp, issued, nil
}

// maxEncoded bounds the wire-form cache: far above the identities one node
// serves at a time.
const maxEncoded = 4096

type encodedSVID struct {
	svid   *x509svid.SVID
	chain  []byte // DER certificates, leaf first
	key    []byte // PKCS#8
	issued issuedSVID
}

// encode returns the wire form of svid, encoding it only when the cache
// handed out a new SVID for this ID and DNS names.
func (s *Server) encode(id string, dns []string, svid *x509svid.SVID) (encodedSVID, error) {
	k := id
	if len(dns) > 0 {
		k += "\x00" + strings.Join(dns, "\x00")
	}
	s.encMu.RLock()
	e, ok := s.encoded[k]
	s.encMu.RUnlock()
	if ok && e.svid == svid {
		return e, nil
	}
	key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return encodedSVID{}, err
	}
	leaf := svid.Certificates[0]
	e = encodedSVID{svid: svid, chain: concatDER(svid.Certificates), key: key, issued: issuedSVID{
		id: id, serial: hex.EncodeToString(leaf.SerialNumber.Bytes()), expires: leaf.NotAfter.UTC().Format("2006-01-02T15:04:05Z"),
	}}
	s.encMu.Lock()
	if len(s.encoded) >= maxEncoded {
		// Identities come and go with pods; drop the lot rather than keep
		// keys of workloads long gone. Re-encoding is cheap.
		clear(s.encoded)
	}
	s.encoded[k] = e // replaces the rotated one: one entry per identity
	s.encMu.Unlock()
	return e, nil
}

func sameX509Response(a, b *workloadpb.X509SVIDResponse) bool {
	if len(a.Svids) != len(b.Svids) || len(a.FederatedBundles) != len(b.FederatedBundles) {
		return false
	}
	for i := range a.Svids {
		x, y := a.Svids[i], b.Svids[i]
		if x.SpiffeId != y.SpiffeId || x.Hint != y.Hint || !bytes.Equal(x.X509Svid, y.X509Svid) || !bytes.Equal(x.Bundle, y.Bundle) {
			return false
		}
	}
	return sameBundleMap(a.FederatedBundles, b.FederatedBundles)
}

func sameBundleMap(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

func concatDER(certs []*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, c.Raw...)
	}
	return b
}

func (s *Server) federationChanged() <-chan struct{} {
	if s.fed == nil {
		return nil
	}
	return s.fed.Changed()
}

func (s *Server) federated() map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	if s.fed == nil {
		return nil
	}
	return s.fed.Bundles()
}

func (s *Server) federatedX509() map[string][]byte {
	fed := s.federated()
	if len(fed) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(fed))
	for td, b := range fed {
		out[td.IDString()] = concatDER(b.X509Authorities())
	}
	return out
}

// FetchJWTSVID mints JWT-SVIDs for the requested audience.
func (s *Server) FetchJWTSVID(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	for _, a := range req.Audience {
		if a == "" {
			return nil, status.Error(codes.InvalidArgument, "audience must not contain an empty value")
		}
	}
	var want spiffeid.ID
	if req.SpiffeId != "" {
		var err error
		if want, err = spiffeid.FromString(req.SpiffeId); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "invalid requested SPIFFE ID: %v", err)
		}
	}
	c, err := s.attest(ctx)
	if err != nil {
		return nil, err
	}
	ids, err := s.entitled(c)
	if err != nil {
		return nil, err
	}
	resp := &workloadpb.JWTSVIDResponse{}
	for _, id := range ids {
		if !want.IsZero() && id.ID != want {
			continue
		}
		token, expires, err := s.cache.JWTSVID(ctx, id.ID, req.Audience)
		if err != nil {
			klog.ErrorS(err, "Minting JWT-SVID failed", "spiffe_id", id.ID.String())
			return nil, status.Errorf(codes.Unavailable, "could not mint JWT-SVID for %s: %v", id.ID, err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.JWTSVID{SpiffeId: id.ID.String(), Svid: token, Hint: id.Hint})
		klog.InfoS("Issued JWT-SVID", "spiffe_id", id.ID.String(), "jti", jwtID(token), "audience", req.Audience, "expires", expires.UTC().Format("2006-01-02T15:04:05Z"), "pid", c.pid, "attributes", c.attrs.String())
	}
	if len(resp.Svids) == 0 {
		return nil, status.Errorf(codes.PermissionDenied, "caller is not entitled to %s", req.SpiffeId)
	}
	return resp, nil
}

// jwtID reads the jti of a token we minted ourselves, for the audit line.
func jwtID(token string) string {
	svid, err := jwtsvid.ParseInsecure(token, []string{})
	if err != nil {
		return ""
	}
	if jti, ok := svid.Claims["jti"].(string); ok {
		return jti
	}
	return ""
}

// FetchX509Bundles streams the X.509 bundles of our and federated trust
// domains, sending only when they change.
func (s *Server) FetchX509Bundles(_ *workloadpb.X509BundlesRequest, stream grpc.ServerStreamingServer[workloadpb.X509BundlesResponse]) error {
	return s.streamBundles(stream.Context(), s.x509Bundles, func(b map[string][]byte) error {
		return stream.Send(&workloadpb.X509BundlesResponse{Bundles: b})
	})
}

// FetchJWTBundles streams the JWKS of our and federated trust domains.
func (s *Server) FetchJWTBundles(_ *workloadpb.JWTBundlesRequest, stream grpc.ServerStreamingServer[workloadpb.JWTBundlesResponse]) error {
	return s.streamBundles(stream.Context(), s.jwtBundles, func(b map[string][]byte) error {
		return stream.Send(&workloadpb.JWTBundlesResponse{Bundles: b})
	})
}

// streamBundles sends the bundles at once and again whenever they change,
// until the client goes away or is no longer entitled.
func (s *Server) streamBundles(ctx context.Context, build func() (map[string][]byte, error), send func(map[string][]byte) error) error {
	var last map[string][]byte
	for {
		cacheCh, rulesCh, fedCh := s.cache.Changed(), s.rulesChanged(), s.federationChanged()
		// As SPIRE does, bundles go to callers entitled to an identity,
		// re-checked at every change like the SVID stream.
		c, err := s.attest(ctx)
		if err != nil {
			return err
		}
		if _, err := s.entitled(c); err != nil {
			return err
		}
		bundles, err := build()
		if err != nil {
			return status.Errorf(codes.Internal, "encode bundles: %v", err)
		}
		if last == nil || !sameBundleMap(last, bundles) {
			if err := send(bundles); err != nil {
				return err
			}
			last = bundles
		}
		select {
		case <-ctx.Done():
			return nil
		case <-cacheCh:
		case <-rulesCh:
		case <-fedCh:
		}
	}
}

// x509Bundles holds the DER certificates of each trust domain's X.509 authorities.
func (s *Server) x509Bundles() (map[string][]byte, error) {
	bundles := s.federatedX509()
	if bundles == nil {
		bundles = map[string][]byte{}
	}
	bundles[s.td.IDString()] = concatDER(s.authority.Bundle().X509Authorities())
	return bundles, nil
}

// jwtBundles marshals each trust domain's JWT authorities as a JWKS (keys
// with kid and use "jwt-svid", no X.509 authorities).
func (s *Server) jwtBundles() (map[string][]byte, error) {
	out := map[string][]byte{}
	add := func(b *spiffebundle.Bundle) error {
		jb := spiffebundle.FromJWTAuthorities(b.TrustDomain(), b.JWTAuthorities())
		data, err := jb.Marshal()
		if err != nil {
			return fmt.Errorf("bundle of %s: %w", b.TrustDomain(), err)
		}
		out[b.TrustDomain().IDString()] = data
		return nil
	}
	if err := add(s.authority.Bundle()); err != nil {
		return nil, err
	}
	for _, b := range s.federated() {
		if err := add(b); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ValidateJWTSVID checks a token against the bundle of its trust domain.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if req.Audience == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	if _, err := s.attest(ctx); err != nil {
		return nil, err
	}
	svid, err := jwtsvid.ParseAndValidate(req.Svid, s.jwtSource(), []string{req.Audience})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode claims: %v", err)
	}
	return &workloadpb.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// jwtSource serves our bundle and the federated ones for validation.
func (s *Server) jwtSource() jwtbundle.Source {
	set := jwtbundle.NewSet(s.authority.Bundle().JWTBundle())
	for _, b := range s.federated() {
		set.Add(b.JWTBundle())
	}
	return set
}
