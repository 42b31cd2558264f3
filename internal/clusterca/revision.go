package clusterca

import (
	"strconv"

	"github.com/csi-agent/csi-agent/internal/ca"
)

// TrustRevision is Trust with the largest resourceVersion among the
// ClusterTrustBundles and the JWKS ConfigMap it was built from. Backed by
// etcd, a resourceVersion is the revision of the object's last write, one
// counter for the whole cluster: every controller replica derives the same
// number from the same objects, and it grows with each write, across
// restarts and failovers. It never decreases within a process (a deleted
// object does not take the number back).
func (c *Client) TrustRevision() (t ca.Trust, revision uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.trust, c.rev, c.synced
}

// resourceRevision parses a resourceVersion; 0 when it is not a number
// (an API server not backed by etcd), so that it never raises the count.
func resourceRevision(rv string) uint64 {
	n, err := strconv.ParseUint(rv, 10, 64)
	if err != nil {
		return 0
	}
	return n
}
