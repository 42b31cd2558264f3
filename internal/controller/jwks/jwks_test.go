package jwks

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func key(t *testing.T, node string, notAfter time.Time) cluster.JWTKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := cluster.KeyID(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return cluster.JWTKey{Node: node, KeyID: kid, Public: k.Public(), NotAfter: notAfter}
}

func kids(keys []cluster.JWTKey) []string {
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		out = append(out, k.KeyID)
	}
	return out
}

func TestAdd(t *testing.T) {
	a1 := key(t, "a", t0.Add(time.Hour))
	b1 := key(t, "b", t0.Add(time.Hour))
	keys, changed := Add(nil, a1)
	if !changed || len(keys) != 1 {
		t.Fatalf("Add to empty: %v %v", kids(keys), changed)
	}
	keys, _ = Add(keys, b1)

	// The same key again: a later NotAfter extends it, an earlier one is ignored.
	longer := a1
	longer.NotAfter = t0.Add(2 * time.Hour)
	if got, changed := Add(keys, longer); !changed || len(got) != 2 || !got[0].NotAfter.Equal(longer.NotAfter) {
		t.Fatalf("re-registration not extended: %v", got)
	}
	shorter := a1
	shorter.NotAfter = t0
	if _, changed := Add(keys, shorter); changed {
		t.Fatal("re-registration with a shorter life changed the JWKS")
	}
	// Another node cannot claim a key already published.
	stolen := a1
	stolen.Node, stolen.NotAfter = "b", t0.Add(5*time.Hour)
	if got, changed := Add(keys, stolen); changed || got[0].Node != "a" {
		t.Fatal("another node took over a published key")
	}
}

func TestAddBoundsKeysPerNode(t *testing.T) {
	var keys []cluster.JWTKey
	other := key(t, "b", t0.Add(time.Minute))
	keys, _ = Add(keys, other)
	var mine []cluster.JWTKey
	for i := range MaxKeysPerNode + 2 {
		k := key(t, "a", t0.Add(time.Duration(i+1)*time.Hour))
		mine = append(mine, k)
		keys, _ = Add(keys, k)
	}
	count := 0
	for _, k := range keys {
		if k.Node == "a" {
			count++
		}
	}
	if count != MaxKeysPerNode {
		t.Fatalf("node a has %d keys, want %d", count, MaxKeysPerNode)
	}
	// The oldest went; the other node's key stayed; the newest is in.
	got := fmt.Sprint(kids(keys))
	for _, k := range mine[:2] {
		if contains(keys, k.KeyID) {
			t.Fatalf("oldest key %s kept: %s", k.KeyID, got)
		}
	}
	if !contains(keys, other.KeyID) || !contains(keys, mine[len(mine)-1].KeyID) {
		t.Fatalf("wrong keys dropped: %s", got)
	}
}

func contains(keys []cluster.JWTKey, kid string) bool {
	for _, k := range keys {
		if k.KeyID == kid {
			return true
		}
	}
	return false
}

func TestPrune(t *testing.T) {
	live := key(t, "a", t0.Add(time.Hour))
	expired := key(t, "a", t0)
	gone := key(t, "deleted", t0.Add(time.Hour))
	keys := []cluster.JWTKey{live, expired, gone}
	exists := func(n string) bool { return n != "deleted" }

	for _, tt := range []struct {
		name   string
		exists func(string) bool
		want   []cluster.JWTKey
	}{
		{"expired and deleted node", exists, []cluster.JWTKey{live}},
		{"expired only without node knowledge", nil, []cluster.JWTKey{live, gone}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, changed := Prune(keys, t0, tt.exists)
			if !changed || fmt.Sprint(kids(got)) != fmt.Sprint(kids(tt.want)) {
				t.Fatalf("Prune = %v (changed %v), want %v", kids(got), changed, kids(tt.want))
			}
		})
	}
	if _, changed := Prune([]cluster.JWTKey{live}, t0, exists); changed {
		t.Fatal("Prune changed a JWKS with nothing to prune")
	}
	if got := NextExpiry(keys); !got.Equal(t0) {
		t.Fatalf("NextExpiry = %s, want %s", got, t0)
	}
	if !NextExpiry(nil).IsZero() {
		t.Fatal("NextExpiry of nothing is not zero")
	}
}
