// Package workloadapi serves the SPIFFE Workload API: it attests each caller
// on every RPC, maps the attested facts through the rules to SPIFFE IDs, and
// hands out X.509-SVIDs, JWT-SVIDs and bundles, streaming every change.
//
// One file per concern: attest.go identifies callers, x509.go, jwt.go and
// bundles.go serve the RPCs, grpc.go builds the gRPC server, listen.go the
// socket.
package workloadapi

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/federation"
	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// Attestor establishes the facts about the process with the given PID from
// procfs. It is the seam to the Unix attestor.
type Attestor interface {
	Attest(ctx context.Context, pid int32) (attestor.Attributes, error)
}

// PodAttestor establishes the facts about the pod and container of the
// process with the given PID: Attest waits for the kubelet to list a new
// container up to the attestor's own bound, AttestWithContainerWait up to
// containerWait. It is the seam to the Kubernetes attestor.
type PodAttestor interface {
	Attest(ctx context.Context, pid int32) (attestor.Attributes, error)
	AttestWithContainerWait(ctx context.Context, pid int32, containerWait time.Duration) (attestor.Attributes, error)
}

// BundleSource supplies our trust domain's bundle.
type BundleSource interface {
	Bundle() *spiffebundle.Bundle
}

// SVIDSource hands out SVIDs, minted once and shared between callers;
// minted tells the one call that minted, to audit.
type SVIDSource interface {
	X509SVID(ctx context.Context, id spiffeid.ID, dnsNames []string) (svid *x509svid.SVID, minted bool, err error)
	JWTSVID(ctx context.Context, id spiffeid.ID, audience []string) (jwt svidcache.JWT, minted bool, err error)
	// Subscribe wakes a stream when an SVID it watches is renewed, or
	// everything changed (bundle, intermediate).
	Subscribe() *svidcache.Subscription
}

// Options configure a Server.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	// Unix attests every caller.
	Unix Attestor
	// Pods attests callers in pods; nil when Kubernetes attestation is off.
	Pods   PodAttestor
	Rules  *rules.Set
	Bundle BundleSource
	SVIDs  SVIDSource
	// Federation may be nil: no federated bundles.
	Federation *federation.Watcher
	// MaxAudiences and MaxAudienceBytes bound a JWT-SVID audience (its
	// count of values, and each value's size); zero: no bound.
	MaxAudiences, MaxAudienceBytes int
	// Metrics, if set, is told of attestations, refusals and streams.
	Metrics Metrics
}

// Server implements the Workload API.
type Server struct {
	workloadpb.UnimplementedSpiffeWorkloadAPIServer

	td     spiffeid.TrustDomain
	unix   Attestor
	pods   PodAttestor
	bundle BundleSource
	svids  SVIDSource
	fed    *federation.Watcher
	// metrics is never nil; refusals logs refused calls, rate limited.
	metrics  Metrics
	refusals *refusalLog

	maxAudiences, maxAudienceBytes int

	// rules is the one holder of the running rules; SetRules swaps them.
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
	case opts.Unix == nil:
		return nil, errors.New("workloadapi: Unix attestor is required")
	case opts.Rules == nil:
		return nil, errors.New("workloadapi: rules are required")
	case opts.Bundle == nil || opts.SVIDs == nil:
		return nil, errors.New("workloadapi: bundle and SVID sources are required")
	}
	s := &Server{
		td:     opts.TrustDomain,
		unix:   opts.Unix,
		pods:   opts.Pods,
		bundle: opts.Bundle,
		svids:  opts.SVIDs,
		fed:    opts.Federation,

		metrics:          noMetrics{},
		refusals:         newRefusalLog(time.Now),
		maxAudiences:     opts.MaxAudiences,
		maxAudienceBytes: opts.MaxAudienceBytes,
		rulesChange:      make(chan struct{}),
		encoded:          map[string]encodedSVID{},
	}
	if opts.Metrics != nil {
		s.metrics = opts.Metrics
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
