// Package k8s attests Workload API callers that run in Kubernetes pods: the
// caller's cgroup names its pod and container, the local kubelet supplies the
// facts about them, and the CSI mount records gate who may be attested at all.
//
// Fields set (see the Field constants):
//
//	kubernetes.namespace, kubernetes.pod_name, kubernetes.pod_uid,
//	kubernetes.service_account (absent when the pod has none, e.g. static pods),
//	kubernetes.node_name (pod spec.nodeName, else Options.NodeName),
//	kubernetes.pod_label.<key> (one field per label),
//	kubernetes.pod_owner_kind / _name / _uid (the controller owner reference, if any),
//	kubernetes.pod_image (multi: every regular container's spec image, status image and image ID),
//	kubernetes.pod_image_count (number of regular containers in the spec),
//	kubernetes.pod_init_image, kubernetes.pod_init_image_count (the same for init containers,
//	native sidecars included),
//	and, once the kubelet reports the caller's container ID:
//	kubernetes.container_id (64 hex, no runtime prefix), kubernetes.container_name,
//	kubernetes.container_image (status image, else spec image), kubernetes.container_image_id,
//	kubernetes.container_type (container | init | sidecar | ephemeral).
package k8s

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/procfs"
	"github.com/csi-agent/csi-agent/internal/records"
)

// CrossCheck says what to do when a caller's pod has no CSI mount record, or
// one that disagrees with the kubelet.
type CrossCheck string

const (
	// CrossCheckEnforce denies the caller (the default).
	CrossCheckEnforce CrossCheck = "enforce"
	// CrossCheckWarn logs the failure and attests anyway.
	CrossCheckWarn CrossCheck = "warn"
	// CrossCheckOff skips the check.
	CrossCheckOff CrossCheck = "off"
)

// ParseCrossCheck reads a cross-check mode.
func ParseCrossCheck(s string) (CrossCheck, error) {
	switch m := CrossCheck(s); m {
	case CrossCheckEnforce, CrossCheckWarn, CrossCheckOff:
		return m, nil
	}
	return "", fmt.Errorf("invalid cross-check mode %q: want %q, %q or %q", s, CrossCheckEnforce, CrossCheckWarn, CrossCheckOff)
}

// Records are the CSI mount records of the node: the seam to the journal.
type Records interface {
	ByPodUID(podUID string) []records.Record
}

// Options configure an Attestor; internal/config owns their defaults.
type Options struct {
	// ProcRoot is where /proc/<pid>/cgroup is read (required).
	ProcRoot string
	// Pods lists the kubelet's pods (required).
	Pods PodLister
	// Records are the CSI mount records (required unless CrossCheck is off).
	Records Records
	// CrossCheck is CrossCheckEnforce, CrossCheckWarn or CrossCheckOff.
	CrossCheck CrossCheck
	// NodeName is reported when a pod's spec does not carry it.
	NodeName string
	// MinRefreshInterval is the least time between two kubelet requests; a
	// result is reused for at least this long.
	MinRefreshInterval time.Duration
	// RetryBudget bounds the wait for a pod the kubelet does not list yet.
	RetryBudget time.Duration
	// ContainerWait bounds the wait for the caller's container ID once its
	// pod is listed; after it the caller gets the pod-level fields only.
	ContainerWait time.Duration
	// MaxCacheAge bounds how old a pod list may be and still answer without
	// a new request, so label and owner changes show within it.
	MaxCacheAge time.Duration
	// RequestTimeout bounds one pod list request.
	RequestTimeout time.Duration
	// Clock defaults to the real clock.
	Clock clock.Clock
}

// Attestor attests callers by pid. It is safe for concurrent use.
type Attestor struct {
	proc          *procfs.FS
	records       Records
	mode          CrossCheck
	nodeName      string
	retryBudget   time.Duration
	containerWait time.Duration
	maxCacheAge   time.Duration
	clock         clock.Clock
	cache         *podCache
}

// New checks opts and returns an Attestor.
func New(opts Options) (*Attestor, error) {
	if opts.Pods == nil {
		return nil, errors.New("kubernetes attestor needs a pod lister")
	}
	proc, err := procfs.New(opts.ProcRoot)
	if err != nil {
		return nil, fmt.Errorf("kubernetes attestor needs a proc root: %w", err)
	}
	mode, err := ParseCrossCheck(string(opts.CrossCheck))
	if err != nil {
		return nil, err
	}
	if mode != CrossCheckOff && opts.Records == nil {
		return nil, fmt.Errorf("cross-check %q needs the mount records", mode)
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{
		{"min refresh interval", opts.MinRefreshInterval},
		{"retry budget", opts.RetryBudget},
		{"container wait", opts.ContainerWait},
		{"max cache age", opts.MaxCacheAge},
	} {
		if d.d < 0 {
			return nil, fmt.Errorf("%s %v is negative", d.name, d.d)
		}
	}
	if opts.RequestTimeout <= 0 {
		return nil, fmt.Errorf("request timeout %v is not positive", opts.RequestTimeout)
	}
	if opts.ContainerWait > opts.RetryBudget {
		return nil, fmt.Errorf("container wait %v exceeds the retry budget %v", opts.ContainerWait, opts.RetryBudget)
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	return &Attestor{
		proc:          proc,
		records:       opts.Records,
		mode:          mode,
		nodeName:      opts.NodeName,
		retryBudget:   opts.RetryBudget,
		containerWait: opts.ContainerWait,
		maxCacheAge:   opts.MaxCacheAge,
		clock:         opts.Clock,
		cache: &podCache{
			lister:         opts.Pods,
			clock:          opts.Clock,
			minInterval:    opts.MinRefreshInterval,
			requestTimeout: opts.RequestTimeout,
		},
	}, nil
}

// KubeletRequests counts the pod list requests made so far.
func (a *Attestor) KubeletRequests() uint64 { return a.cache.requests.Load() }

// Attest returns the Kubernetes facts of process pid, or (nil, nil) when it
// does not run in a pod. Errors wrap attestor.ErrUnavailable (kubelet
// unreachable, pod not listed within the retry budget) or attestor.ErrDenied
// (cross-check failed, cgroup ambiguous, process gone).
func (a *Attestor) Attest(ctx context.Context, pid int32) (attestor.Attributes, error) {
	return a.AttestWithContainerWait(ctx, pid, a.containerWait)
}

// AttestWithContainerWait is Attest with its own bound on the wait for the
// kubelet to list the caller's container; zero answers with pod-level
// fields from the first pod list that has the pod. Callers whose rules read
// no container field use zero: waiting would only delay a new pod's first SVID.
func (a *Attestor) AttestWithContainerWait(ctx context.Context, pid int32, containerWait time.Duration) (attestor.Attributes, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("%w: pid %d is outside the agent's PID namespace", attestor.ErrDenied, pid)
	}
	data, err := a.proc.ReadFile(pid, "cgroup", nil, maxCgroupSize)
	if err != nil {
		if errors.Is(err, procfs.ErrGone) {
			return nil, fmt.Errorf("%w: process %d is gone", attestor.ErrDenied, pid)
		}
		return nil, fmt.Errorf("%w: read cgroup of process %d: %w", attestor.ErrUnavailable, pid, err)
	}
	podUID, containerID, err := ParseCgroup(data)
	if err != nil {
		return nil, fmt.Errorf("%w: process %d: %w", attestor.ErrDenied, pid, err)
	}
	if podUID == "" {
		return nil, nil
	}
	// A pod without our volume (socket reached through a hostPath) is turned
	// away before it costs a kubelet request.
	if a.mode == CrossCheckEnforce && len(a.records.ByPodUID(podUID)) == 0 {
		return nil, a.deny(pid, podUID, nil, "pod has no csi-agent volume mount record")
	}

	p, match, err := a.lookup(ctx, podUID, containerID, min(max(containerWait, 0), a.retryBudget))
	if err != nil {
		return nil, err
	}
	if reason := a.crossCheck(podUID, p); reason != "" {
		if a.mode == CrossCheckEnforce {
			return nil, a.deny(pid, podUID, p, reason)
		}
		klog.InfoS("Kubernetes cross-check failed, attesting anyway", "mode", a.mode, "reason", reason,
			"pid", pid, "pod_uid", podUID, "namespace", p.Metadata.Namespace, "pod", p.Metadata.Name,
			"service_account", p.serviceAccount())
	}

	attrs := p.podAttributes(a.nodeName)
	if match != nil {
		addContainerAttributes(attrs, containerID, *match)
	}
	return attrs, nil
}

// lookup finds the pod, and the container when the kubelet reports it within
// the container wait. Requests are shared through the cache.
func (a *Attestor) lookup(ctx context.Context, podUID, containerID string, containerWait time.Duration) (*pod, *containerMatch, error) {
	start := a.clock.Now()
	podDeadline := start.Add(a.retryBudget)
	containerDeadline := start.Add(containerWait)

	var gen uint64
	if cur := a.cache.current(); cur != nil && a.clock.Since(cur.fetchedAt) > a.maxCacheAge {
		gen = cur.gen
	}
	var found *pod
	for {
		deadline := podDeadline
		if found != nil {
			deadline = containerDeadline
		}
		list, err := a.cache.newerThan(ctx, gen, deadline)
		switch {
		case errors.Is(err, errDeadline) && found != nil:
			return a.podOnly(found, containerID)
		case errors.Is(err, errDeadline):
			return nil, nil, fmt.Errorf("%w: pod %s not listed by the kubelet within %v", attestor.ErrUnavailable, podUID, a.retryBudget)
		case err != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
			return nil, nil, fmt.Errorf("%w: waiting for the kubelet: %w", attestor.ErrUnavailable, err)
		case err != nil:
			if !errors.Is(err, attestor.ErrUnavailable) {
				err = fmt.Errorf("%w: %w", attestor.ErrUnavailable, err)
			}
			return nil, nil, err
		}
		gen = list.gen
		if p := list.byUID[podUID]; p != nil {
			found = p
			if containerID == "" {
				return p, nil, nil
			}
			if m, ok := p.container(containerID); ok {
				return p, &m, nil
			}
		}
		now := a.clock.Now()
		if found != nil && !now.Before(containerDeadline) {
			return a.podOnly(found, containerID)
		}
		if found == nil && !now.Before(podDeadline) {
			return nil, nil, fmt.Errorf("%w: pod %s not listed by the kubelet within %v", attestor.ErrUnavailable, podUID, a.retryBudget)
		}
	}
}

func (a *Attestor) podOnly(p *pod, containerID string) (*pod, *containerMatch, error) {
	klog.V(2).InfoS("Container not in the kubelet's pod status yet, attesting pod-level fields only",
		"pod_uid", p.Metadata.UID, "namespace", p.Metadata.Namespace, "pod", p.Metadata.Name, "container_id", containerID)
	return p, nil, nil
}

// crossCheck returns why the pod's mount records do not vouch for it, or "".
// The kubelet stays the authority for the facts; the records only gate.
func (a *Attestor) crossCheck(podUID string, p *pod) string {
	if a.mode == CrossCheckOff {
		return ""
	}
	recs := a.records.ByPodUID(podUID)
	if len(recs) == 0 {
		return "pod has no csi-agent volume mount record"
	}
	for _, r := range recs {
		switch {
		case r.PodNamespace != p.Metadata.Namespace:
			return fmt.Sprintf("mount record %s has namespace %q, kubelet says %q", r.TargetPath, r.PodNamespace, p.Metadata.Namespace)
		case r.PodName != p.Metadata.Name:
			return fmt.Sprintf("mount record %s has pod name %q, kubelet says %q", r.TargetPath, r.PodName, p.Metadata.Name)
		case r.ServiceAccount != p.serviceAccount():
			return fmt.Sprintf("mount record %s has service account %q, kubelet says %q", r.TargetPath, r.ServiceAccount, p.serviceAccount())
		}
	}
	return ""
}

// deny writes the audit line and returns the error.
func (a *Attestor) deny(pid int32, podUID string, p *pod, reason string) error {
	kv := []any{"reason", reason, "pid", pid, "podUID", podUID}
	if p != nil {
		kv = append(kv, "namespace", p.Metadata.Namespace, "pod", p.Metadata.Name, "serviceAccount", p.serviceAccount())
	}
	klog.InfoS("Kubernetes attestation denied", kv...)
	return fmt.Errorf("%w: pod %s: %s", attestor.ErrDenied, podUID, reason)
}
