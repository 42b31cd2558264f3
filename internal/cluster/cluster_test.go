package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNodeID(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for _, tc := range []struct {
		node    string
		wantErr bool
	}{
		{"node-a", false},
		{"ip-10-0-0-1.ec2.internal", false},
		{"", true},
		{"a/b", true}, // FromPath accepts it; NodeFromID must not round-trip it
	} {
		id, err := NodeID(td, tc.node)
		if err == nil {
			var got string
			got, err = NodeFromID(td, id)
			if err == nil && got != tc.node {
				t.Errorf("NodeFromID(NodeID(%q)) = %q", tc.node, got)
			}
		}
		if (err != nil) != tc.wantErr {
			t.Errorf("node %q: err = %v, want error %v", tc.node, err, tc.wantErr)
		}
	}
	other := spiffeid.RequireTrustDomainFromString("other.org")
	id, _ := NodeID(other, "n")
	if _, err := NodeFromID(td, id); err == nil {
		t.Error("a node ID of another trust domain was accepted")
	}
	if _, err := NodeFromID(td, spiffeid.RequireFromPath(td, "/ns/x/sa/y")); err == nil {
		t.Error("a workload ID was accepted as a node ID")
	}
}

func TestTrustBundleName(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	if got, want := TrustBundleName(SVIDSigner, td), "csi-agent.spiffe.io:svid:example.org"; got != want {
		t.Errorf("TrustBundleName = %q, want %q", got, want)
	}
}

func TestJWKSRoundTrip(t *testing.T) {
	k1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	k2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kid1, _ := KeyID(&k1.PublicKey)
	kid2, _ := KeyID(&k2.PublicKey)
	exp := time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)
	data, err := MarshalJWKS([]JWTKey{
		{Node: "a", KeyID: kid1, Public: &k1.PublicKey, NotAfter: exp},
		{Node: "b", KeyID: kid2, Public: &k2.PublicKey, NotAfter: exp},
	})
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ParseJWKS(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || keys[0].Node != "a" || keys[1].KeyID != kid2 || !keys[0].NotAfter.Equal(exp) ||
		!k1.PublicKey.Equal(keys[0].Public) {
		t.Fatalf("round trip changed the keys: %+v", keys)
	}

	bad := []struct{ name, json string }{
		{"not json", "{"},
		{"no node", strings.Replace(string(data), `"node":"a"`, `"node":""`, 1)},
		{"wrong kid", strings.Replace(string(data), kid1, kid2, 1)},
		{"duplicate", strings.Replace(string(data), kid2, kid1, 1)},
	}
	for _, tc := range bad {
		if _, err := ParseJWKS([]byte(tc.json)); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if _, err := ParseJWKS(make([]byte, MaxJWKSBytes+1)); err == nil {
		t.Error("an oversized JWKS was accepted")
	}
}

func FuzzParseJWKS(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kid, _ := KeyID(&k.PublicKey)
	seed, _ := MarshalJWKS([]JWTKey{{Node: "a", KeyID: kid, Public: &k.PublicKey, NotAfter: time.Now()}})
	f.Add(seed)
	f.Add([]byte(`{"keys":[{"node":"a","jwk":{"kty":"EC","crv":"P-256","x":"AA","y":"AA","d":"AA"}}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := ParseJWKS(data)
		if err != nil {
			return
		}
		for _, k := range keys {
			if kid, err := KeyID(k.Public); err != nil || kid != k.KeyID || k.Node == "" {
				t.Fatalf("accepted an inconsistent key %+v", k)
			}
		}
	})
}
