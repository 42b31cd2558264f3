// Package jwks keeps the list of node JWT-SVID keys the controller
// publishes: adding a registered key, pruning expired keys and the keys of
// deleted nodes.
package jwks

import (
	"slices"
	"time"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// MaxKeysPerNode bounds one node's live keys (an agent renews at half life,
// so it holds two or three); past it the oldest go. A node flooding the
// controller with keys cannot grow the ConfigMap past its limit.
const MaxKeysPerNode = 4

// Add puts k in keys, or extends the entry with k's kid to k's NotAfter,
// and keeps at most MaxKeysPerNode of k's node. It reports a change.
func Add(keys []cluster.JWTKey, k cluster.JWTKey) ([]cluster.JWTKey, bool) {
	out := slices.Clone(keys)
	if i := slices.IndexFunc(out, func(o cluster.JWTKey) bool { return o.KeyID == k.KeyID }); i >= 0 {
		if out[i].Node != k.Node || !k.NotAfter.After(out[i].NotAfter) {
			// A kid is a key's hash: another node's entry for it is not ours
			// to move, and a shorter life changes nothing.
			return keys, false
		}
		out[i].NotAfter = k.NotAfter
		return out, true
	}
	out = append(out, k)
	var mine []int
	for i, o := range out {
		if o.Node == k.Node {
			mine = append(mine, i)
		}
	}
	if extra := len(mine) - MaxKeysPerNode; extra > 0 {
		slices.SortFunc(mine, func(a, b int) int { return out[a].NotAfter.Compare(out[b].NotAfter) })
		drop := map[int]bool{}
		for _, i := range mine[:extra] {
			drop[i] = true
		}
		kept := out[:0:0]
		for i, o := range out {
			if !drop[i] {
				kept = append(kept, o)
			}
		}
		out = kept
	}
	return out, true
}

// Prune drops keys whose NotAfter has passed and keys of nodes that do not
// exist (nodeExists nil: none is dropped for that). It reports a change.
func Prune(keys []cluster.JWTKey, now time.Time, nodeExists func(string) bool) ([]cluster.JWTKey, bool) {
	out := make([]cluster.JWTKey, 0, len(keys))
	for _, k := range keys {
		if !now.Before(k.NotAfter) || (nodeExists != nil && !nodeExists(k.Node)) {
			continue
		}
		out = append(out, k)
	}
	return out, len(out) != len(keys)
}

// NextExpiry is the earliest NotAfter among keys (zero when there are none).
func NextExpiry(keys []cluster.JWTKey) time.Time {
	var at time.Time
	for _, k := range keys {
		if at.IsZero() || k.NotAfter.Before(at) {
			at = k.NotAfter
		}
	}
	return at
}
