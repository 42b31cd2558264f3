package workloadapi

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/attestor"
	"github.com/csi-agent/csi-agent/internal/peer"
)

// Metrics receives the server's counts; label values are the constants
// below, never anything a caller chooses. internal/metrics implements it.
type Metrics interface {
	Attested(attestor, result string)
	Denied(reason string)
	StreamsOpen(delta int)
}

type noMetrics struct{}

func (noMetrics) Attested(string, string) {}
func (noMetrics) Denied(string)           {}
func (noMetrics) StreamsOpen(int)         {}

// Attestors and attestation results, as Metrics.Attested is told them.
const (
	attestorUnix = "unix"
	attestorK8s  = "k8s"

	attestOK          = "ok"
	attestUnavailable = "unavailable"
	attestError       = "error"
)

// attested counts an attestation; tests build Servers without metrics.
func (s *Server) attested(attestor, result string) {
	if s.metrics != nil {
		s.metrics.Attested(attestor, result)
	}
}

func attestResult(err error) string {
	switch {
	case err == nil:
		return attestOK
	case errors.Is(err, attestor.ErrUnavailable):
		return attestUnavailable
	}
	return attestError
}

// Reasons a call is refused: the one list, for the metric and the log.
const (
	reasonNoHeader           = "missing_security_header"
	reasonNotReady           = "not_ready"
	reasonRevoked            = "connection_revoked"
	reasonOutsidePIDNS       = "outside_pid_namespace"
	reasonAttestUnavailable  = "attestation_unavailable"
	reasonAttestFailed       = "attestation_failed"
	reasonCredentialsChanged = "credentials_changed"
	reasonCallerExited       = "caller_exited"
	reasonNoRule             = "no_matching_rule"
	reasonNotEntitled        = "not_entitled"
	reasonInvalidRequest     = "invalid_request"
	reasonDeniedBudget       = "denied_call_budget"
	reasonCallerStreams      = "caller_stream_limit"
	reasonTotalStreams       = "stream_limit"
)

// refusal is a gRPC status error that also says why, for the metric and
// the log; grpc-go reads its status through GRPCStatus.
type refusal struct {
	reason string
	st     *status.Status
}

func (r *refusal) Error() string              { return r.st.Err().Error() }
func (r *refusal) GRPCStatus() *status.Status { return r.st }

// refuse is status.Errorf with a reason from the list above.
func refuse(reason string, c codes.Code, format string, args ...any) error {
	return &refusal{reason: reason, st: status.New(c, fmt.Sprintf(format, args...))}
}

// refusalReason is the reason err refused a call, or "" when it did not.
func refusalReason(err error) string {
	var r *refusal
	if errors.As(err, &r) {
		return r.reason
	}
	if status.Code(err) == codes.InvalidArgument {
		return reasonInvalidRequest
	}
	return ""
}

// Refusal logging: the first refusalBurst refusals of a caller in each
// refusalWindow are logged, the rest counted and summed up in one line
// once the window is over (at the caller's next refusal or the next
// sweep). At most maxRefusalCallers callers are tracked, plus one budget
// shared by any beyond.
const (
	refusalBurst      = 5
	refusalWindow     = time.Minute
	maxRefusalCallers = 4096
	otherCallers      = "(others)"
)

type refusalLog struct {
	clock func() time.Time
	out   func(msg string, keysAndValues ...any) // klog.InfoS; tests read it

	mu      sync.Mutex
	callers map[string]*refusalCount
	sweepAt time.Time
}

type refusalCount struct {
	start              time.Time
	logged, suppressed int
}

func newRefusalLog(clock func() time.Time) *refusalLog {
	return &refusalLog{clock: clock, out: klog.InfoS, callers: map[string]*refusalCount{}}
}

// What was refused, as the log line says.
const (
	refusedCall       = "Workload API call refused"
	refusedConnection = "Workload API connection refused at the handshake"
)

// log writes what (refusedCall, refusedConnection) by info (nil: no peer)
// unless its caller is over its budget of lines.
func (l *refusalLog) log(what string, info *peer.Info, reason string, err error) {
	key, pid, uid := otherCallers, int32(0), uint32(0)
	if info != nil {
		key, pid, uid = info.Caller(), info.PID, info.UID
	}
	ok, summaries := l.allow(key)
	for _, s := range summaries {
		l.out("Refusals not logged in the last window", "caller", s.key, "refusals", s.n, "window", refusalWindow)
	}
	if ok {
		l.out(what, "reason", reason, "caller", key, "pid", pid, "uid", uid, "err", err)
	}
}

type refusalSummary struct {
	key string
	n   int
}

func (l *refusalLog) allow(key string) (bool, []refusalSummary) {
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []refusalSummary
	if !now.Before(l.sweepAt) {
		for k, c := range l.callers {
			if now.Sub(c.start) >= refusalWindow {
				if c.suppressed > 0 {
					out = append(out, refusalSummary{k, c.suppressed})
				}
				delete(l.callers, k)
			}
		}
		l.sweepAt = now.Add(refusalWindow)
	}
	c := l.callers[key]
	if c == nil && len(l.callers) >= maxRefusalCallers {
		// Keep to the bound: the callers beyond it share one budget.
		key = otherCallers
		c = l.callers[key]
	}
	if c != nil && now.Sub(c.start) >= refusalWindow {
		if c.suppressed > 0 {
			out = append(out, refusalSummary{key, c.suppressed})
		}
		c = nil
	}
	if c == nil {
		c = &refusalCount{start: now}
		l.callers[key] = c
	}
	if c.logged < refusalBurst {
		c.logged++
		return true, out
	}
	c.suppressed++
	return false, out
}
