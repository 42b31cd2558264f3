package oidc

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

func TestDocuments(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	k1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	k2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kid1, _ := cluster.KeyID(k1.Public())
	kid2, _ := cluster.KeyID(k2.Public())
	keys := []cluster.JWTKey{
		{Node: "a", KeyID: kid1, Public: k1.Public(), NotAfter: now.Add(time.Hour)},
		{Node: "b", KeyID: kid2, Public: k2.Public(), NotAfter: now}, // expired
	}
	h, err := NewHandler(Options{Issuer: "https://oidc.example.org/", Keys: func() []cluster.JWTKey { return keys }, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string, into any) *http.Response {
		t.Helper()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("GET %s: %d %s", path, rec.Code, rec.Header().Get("Content-Type"))
		}
		if err := json.Unmarshal(rec.Body.Bytes(), into); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return rec.Result()
	}
	var doc map[string]any
	get(DiscoveryPath, &doc)
	want := map[string]any{
		"issuer":                                "https://oidc.example.org/",
		"jwks_uri":                              "https://oidc.example.org/keys",
		"id_token_signing_alg_values_supported": []any{"ES256"},
		"response_types_supported":              []any{"id_token"},
		"subject_types_supported":               []any{"public"},
	}
	if b1, b2 := mustJSON(t, doc), mustJSON(t, want); b1 != b2 {
		t.Fatalf("discovery = %s\nwant %s", b1, b2)
	}
	var set jose.JSONWebKeySet
	get(KeysPath, &set)
	if len(set.Keys) != 1 || set.Keys[0].KeyID != kid1 || set.Keys[0].Algorithm != "ES256" || set.Keys[0].Use != "sig" {
		t.Fatalf("keys = %+v, want only the live key %s (ES256, sig)", set.Keys, kid1)
	}
	if pub, ok := set.Keys[0].Key.(*ecdsa.PublicKey); !ok || !pub.Equal(k1.Public()) {
		t.Fatal("served key is not the published one")
	}

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, KeysPath, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("POST %s: %d", KeysPath, rec.Code)
	}
}

func TestEmptyKeySetIsAList(t *testing.T) {
	b, _ := json.Marshal(KeySet(nil, time.Now()))
	if string(b) != `{"keys":[]}` {
		t.Fatalf("empty JWKS = %s", b)
	}
}

func TestBadIssuer(t *testing.T) {
	for _, iss := range []string{"", "oidc.example.org", "https://x.org/?a=b", "https://x.org/#f", "ftp://x.org"} {
		if _, err := NewHandler(Options{Issuer: iss, Keys: func() []cluster.JWTKey { return nil }}); err == nil {
			t.Errorf("issuer %q accepted", iss)
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
