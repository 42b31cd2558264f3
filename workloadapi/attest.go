package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/attestor/field"
	"github.com/csi-agent/csi-agent/internal/peer"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// caller is an attested Workload API client.
type caller struct {
	pid   int32
	attrs attestor.Attributes
	info  peer.Info
}

// checkHeader enforces the security header that keeps browsers and other
// SSRF-style proxies from reaching the API.
func checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md.Get("workload.spiffe.io")) != 1 || md.Get("workload.spiffe.io")[0] != "true" {
		return refuse(reasonNoHeader, codes.InvalidArgument, "security header missing from request: set gRPC metadata workload.spiffe.io=true")
	}
	return nil
}

// attest identifies the caller of a Workload API RPC. Errors carry gRPC codes.
func (s *Server) attest(ctx context.Context) (caller, error) {
	if err := checkHeader(ctx); err != nil {
		return caller{}, err
	}
	return s.attestPeer(ctx)
}

// attestPeer identifies the caller without asking for the security header:
// Envoy's SDS requests do not carry it, and SPIRE asks it of Workload API
// methods only.
func (s *Server) attestPeer(ctx context.Context) (caller, error) {
	if !s.ready.Load() {
		return caller{}, refuse(reasonNotReady, codes.Unavailable, "agent is starting up")
	}
	info, ok := peer.FromContext(ctx)
	if !ok {
		return caller{}, status.Error(codes.Internal, "no peer credentials on this connection")
	}
	if reason, revoked := info.Revoked(); revoked {
		return caller{}, refuse(reasonRevoked, codes.PermissionDenied, "%s", reason)
	}
	if info.PID <= 0 {
		return caller{}, refuse(reasonOutsidePIDNS, codes.PermissionDenied, "caller is outside the agent's PID namespace (the agent needs the host PID namespace)")
	}
	attrs, err := s.attestPID(ctx, info.PID)
	if hook := s.afterAttest.Load(); hook != nil {
		(*hook)(info.PID)
	}
	if err != nil {
		switch {
		case errors.Is(err, attestor.ErrUnavailable):
			return caller{}, refuse(reasonAttestUnavailable, codes.Unavailable, "attestation unavailable: %v", err)
		case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
			return caller{}, status.FromContextError(err).Err()
		default:
			// Fail closed: whatever went wrong, no identity.
			return caller{}, refuse(reasonAttestFailed, codes.PermissionDenied, "attestation failed: %v", err)
		}
	}
	// The kernel recorded the caller's effective ids at connect(); procfs
	// shows them now. A process that exec'd a setuid binary since it
	// connected would otherwise be attested as that binary's owner.
	if err := sameCredentials(info, attrs); err != nil {
		reason := fmt.Sprintf("caller credentials changed since connect: %v; this connection is closed", err)
		info.Revoke(reason)
		return caller{}, refuse(reasonCredentialsChanged, codes.PermissionDenied, "%s", reason)
	}
	// Only now that the facts are read do we know whether they were read
	// from the process that connected and not from a successor on its PID.
	if err := info.Alive(); err != nil {
		// Whoever still holds the socket is not the process we attested.
		const reason = "caller process exited during attestation; this connection is closed"
		info.Revoke(reason)
		return caller{}, refuse(reasonCallerExited, codes.PermissionDenied, "%s", reason)
	}
	return caller{pid: info.PID, attrs: attrs, info: info}, nil
}

// sameCredentials checks the attested effective uid and gid against those
// the kernel recorded at connect.
func sameCredentials(info peer.Info, attrs attestor.Attributes) error {
	for _, c := range []struct {
		field string
		want  uint32
	}{{field.UnixUID, info.UID}, {field.UnixGID, info.GID}} {
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
		return nil, refuse(reasonNoRule, codes.PermissionDenied, "no identity issued: no rule matches this workload")
	}
	// Its connection now draws on the reserve kept for entitled callers.
	c.info.MarkEntitled()
	return ids, nil
}

// attestPID establishes the facts about pid: procfs first and, for a caller
// in a pod, the kubelet's.
func (s *Server) attestPID(ctx context.Context, pid int32) (attestor.Attributes, error) {
	attrs, err := s.unix.Attest(ctx, pid)
	s.attested(attestorUnix, attestResult(err))
	if err != nil || s.pods == nil {
		return attrs, err
	}
	// Answer from the pod's facts at once; wait for the kubelet to list a
	// new container only when that could change which identities match.
	// Most pods never wait: their first SVID comes as their process starts.
	kattrs, err := s.pods.AttestWithContainerWait(ctx, pid, 0)
	if err != nil {
		s.attested(attestorK8s, attestResult(err))
		return nil, err
	}
	if kattrs != nil && len(kattrs[field.K8sContainerID]) == 0 {
		probe := attestor.Attributes{}
		probe.Merge(attrs)
		probe.Merge(kattrs)
		if s.rules.Load().Pending(probe, field.IsContainer) {
			if kattrs, err = s.pods.Attest(ctx, pid); err != nil {
				s.attested(attestorK8s, attestResult(err))
				return nil, err
			}
		}
	}
	s.attested(attestorK8s, attestOK)
	attrs.Merge(kattrs)
	return attrs, nil
}
