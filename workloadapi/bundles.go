package workloadapi

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// FetchX509Bundles streams the X.509 bundles of our trust domain and of
// those the caller's SVIDs federate with, sending only when they change.
func (s *Server) FetchX509Bundles(_ *workloadpb.X509BundlesRequest, stream grpc.ServerStreamingServer[workloadpb.X509BundlesResponse]) error {
	return s.streamBundles(stream.Context(), s.x509Bundles, func(b map[string][]byte) error {
		return stream.Send(&workloadpb.X509BundlesResponse{Bundles: b})
	})
}

// FetchJWTBundles streams the JWKS of our trust domain and of those the
// caller's SVIDs federate with.
func (s *Server) FetchJWTBundles(_ *workloadpb.JWTBundlesRequest, stream grpc.ServerStreamingServer[workloadpb.JWTBundlesResponse]) error {
	return s.streamBundles(stream.Context(), s.jwtBundles, func(b map[string][]byte) error {
		return stream.Send(&workloadpb.JWTBundlesResponse{Bundles: b})
	})
}

// streamBundles sends the bundles at once and again whenever they change,
// until the client goes away or is no longer entitled. SVID renewals do not
// concern it: its subscription watches none.
func (s *Server) streamBundles(ctx context.Context, build func([]rules.Identity) (map[string][]byte, error), send func(map[string][]byte) error) error {
	sub := s.svids.Subscribe()
	defer sub.Close()
	var last map[string][]byte
	for {
		wait := s.nextChange(sub)
		// As SPIRE does, bundles go to callers entitled to an identity,
		// re-checked at every change like the SVID stream.
		c, err := s.attest(ctx)
		if err != nil {
			return err
		}
		ids, err := s.entitled(c)
		if err != nil {
			return err
		}
		bundles, err := build(ids)
		if err != nil {
			return status.Errorf(codes.Internal, "encode bundles: %v", err)
		}
		if last == nil || !sameBundleMap(last, bundles) {
			if err := send(bundles); err != nil {
				return err
			}
			last = bundles
		}
		if !wait(ctx) {
			return nil
		}
	}
}

// nextChange returns a wait for the next change a stream must react to:
// sub's wake-up (a renewal of what it watches, or what concerns all), new
// rules or federated bundles. Call it before the round reads anything, so
// that no change slips between; wait reports false once ctx is done.
func (s *Server) nextChange(sub *svidcache.Subscription) (wait func(ctx context.Context) bool) {
	rulesCh, fedCh := s.rulesChanged(), s.federationChanged()
	return func(ctx context.Context) bool {
		select {
		case <-ctx.Done():
			return false
		case <-sub.C():
		case <-rulesCh:
		case <-fedCh:
		}
		return true
	}
}

// x509Bundles holds the DER certificates of each trust domain's X.509
// authorities: ours and those the holder of ids federates with.
func (s *Server) x509Bundles(ids []rules.Identity) (map[string][]byte, error) {
	bundles := s.federatedX509(ids)
	if bundles == nil {
		bundles = map[string][]byte{}
	}
	bundles[s.td.IDString()] = concatDER(s.bundle.Bundle().X509Authorities())
	return bundles, nil
}

// jwtBundles marshals each trust domain's JWT authorities as a JWKS (keys
// with kid and use "jwt-svid", no X.509 authorities): ours and those the
// holder of ids federates with.
func (s *Server) jwtBundles(ids []rules.Identity) (map[string][]byte, error) {
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
	if err := add(s.bundle.Bundle()); err != nil {
		return nil, err
	}
	for _, b := range s.federatedFor(ids) {
		if err := add(b); err != nil {
			return nil, err
		}
	}
	return out, nil
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

// federatedFor returns the federated bundles the holder of ids receives:
// those of the trust domains one of its SVIDs federates with, as SPIRE
// does. An SVID that names none federates with nothing: a new federation
// must not widen every workload's trust.
func (s *Server) federatedFor(ids []rules.Identity) map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	var out map[spiffeid.TrustDomain]*spiffebundle.Bundle
	var all map[spiffeid.TrustDomain]*spiffebundle.Bundle
	for _, id := range ids {
		for _, td := range id.FederatesWith {
			if all == nil {
				if all = s.federated(); len(all) == 0 {
					return nil
				}
			}
			if b, ok := all[td]; ok {
				if out == nil {
					out = map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
				}
				out[td] = b
			}
		}
	}
	return out
}

func (s *Server) federatedX509(ids []rules.Identity) map[string][]byte {
	fed := s.federatedFor(ids)
	if len(fed) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(fed))
	for td, b := range fed {
		out[td.IDString()] = concatDER(b.X509Authorities())
	}
	return out
}
