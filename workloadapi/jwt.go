package workloadapi

import (
	"context"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// FetchJWTSVID mints JWT-SVIDs for the requested audience.
func (s *Server) FetchJWTSVID(ctx context.Context, req *workloadpb.JWTSVIDRequest) (*workloadpb.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if err := s.checkAudience(req.Audience); err != nil {
		return nil, err
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
		jwt, minted, err := s.svids.JWTSVID(ctx, id.ID, req.Audience)
		if err != nil {
			klog.ErrorS(err, "Minting JWT-SVID failed", "spiffe_id", id.ID.String())
			return nil, status.Errorf(codes.Unavailable, "could not mint JWT-SVID for %s: %v", id.ID, err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.JWTSVID{SpiffeId: id.ID.String(), Svid: jwt.Token, Hint: id.Hint})
		// The audit line: one per mint, with the caller that caused it;
		// the cached token handed to further callers only at -v=1, so a
		// busy node does not flood its log pipeline.
		switch v := klog.V(1); {
		case minted:
			klog.InfoS("Issued JWT-SVID", jwtAudit(id.ID, jwt, req.Audience, c)...)
		case v.Enabled():
			v.InfoS("Sent cached JWT-SVID", jwtAudit(id.ID, jwt, req.Audience, c)...)
		}
	}
	if len(resp.Svids) == 0 {
		return nil, refuse(reasonNotEntitled, codes.PermissionDenied, "caller is not entitled to %s", req.SpiffeId)
	}
	return resp, nil
}

func jwtAudit(id spiffeid.ID, jwt svidcache.JWT, audience []string, c caller) []any {
	return []any{"spiffe_id", id.String(), "jti", jwtID(jwt.Token), "audience", audience,
		"expires", jwt.Expires.UTC().Format(time.RFC3339), "pid", c.pid, "attributes", c.attrs.String()}
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

// JWTExpiryLeeway is how long after its exp a JWT-SVID still validates.
const JWTExpiryLeeway = 10 * time.Second

// ValidateJWTSVID checks a token against the bundle of its trust domain.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *workloadpb.ValidateJWTSVIDRequest) (*workloadpb.ValidateJWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if req.Audience == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if err := s.checkAudience([]string{req.Audience}); err != nil {
		return nil, err
	}
	if req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	c, err := s.attest(ctx)
	if err != nil {
		return nil, err
	}
	// As SPIRE does: only the federated bundles the caller receives, so
	// that what it cannot fetch it cannot validate against either.
	svid, err := jwtsvid.ParseAndValidate(req.Svid, s.jwtSource(s.rules.Load().Evaluate(c.attrs)), []string{req.Audience})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	// go-spiffe accepts a token for a minute past its expiry (go-jose's
	// default leeway); a JWT-SVID cannot be revoked, so allow only the skew
	// our own certificates are backdated for.
	if now := time.Now(); now.After(svid.Expiry.Add(JWTExpiryLeeway)) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: expired at %s, more than %s ago", svid.Expiry.UTC().Format(time.RFC3339), JWTExpiryLeeway)
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode claims: %v", err)
	}
	return &workloadpb.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// jwtSource serves our bundle and the federated ones of ids for validation.
func (s *Server) jwtSource(ids []rules.Identity) jwtbundle.Source {
	set := jwtbundle.NewSet(s.bundle.Bundle().JWTBundle())
	for _, b := range s.federatedFor(ids) {
		set.Add(b.JWTBundle())
	}
	return set
}

// checkAudience bounds an audience: it is minted into, cached with and
// audited along every token, so its size is the caller's to choose only
// within limits.
func (s *Server) checkAudience(aud []string) error {
	if s.maxAudiences > 0 && len(aud) > s.maxAudiences {
		return status.Errorf(codes.InvalidArgument, "audience has %d values; at most %d are accepted", len(aud), s.maxAudiences)
	}
	for _, a := range aud {
		switch {
		case a == "":
			return status.Error(codes.InvalidArgument, "audience must not contain an empty value")
		case s.maxAudienceBytes > 0 && len(a) > s.maxAudienceBytes:
			return status.Errorf(codes.InvalidArgument, "an audience value has %d bytes; at most %d are accepted", len(a), s.maxAudienceBytes)
		}
	}
	return nil
}
