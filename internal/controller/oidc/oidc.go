// Package oidc serves OIDC discovery for JWT-SVIDs: the provider
// configuration and the JWKS of every node key the controller published,
// so that relying parties (cloud providers, Vault) can verify JWT-SVIDs.
package oidc

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// Paths served.
const (
	DiscoveryPath = "/.well-known/openid-configuration"
	KeysPath      = "/keys"
)

// cacheMaxAge lets relying parties cache briefly: a new node key reaches
// the ConfigMap before its agent signs with it, but not long before.
const cacheMaxAge = "public, max-age=60"

// Options configure the handler.
type Options struct {
	// Issuer is the "iss" of JWT-SVIDs (https URL, no query or fragment).
	Issuer string
	// Keys returns the published node keys.
	Keys func() []cluster.JWTKey
	// Now is the clock (nil: time.Now); expired keys are not served.
	Now func() time.Time
}

// Discovery is the provider configuration document.
type Discovery struct {
	Issuer        string   `json:"issuer"`
	JWKSURI       string   `json:"jwks_uri"`
	SigningAlgs   []string `json:"id_token_signing_alg_values_supported"`
	ResponseTypes []string `json:"response_types_supported"`
	SubjectTypes  []string `json:"subject_types_supported"`
}

// NewHandler serves DiscoveryPath and KeysPath.
func NewHandler(o Options) (http.Handler, error) {
	u, err := url.Parse(o.Issuer)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("oidc: issuer must be an https URL without query or fragment")
	}
	if o.Keys == nil {
		return nil, errors.New("oidc: no key source")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	doc, err := json.Marshal(Discovery{
		Issuer:        o.Issuer,
		JWKSURI:       strings.TrimSuffix(o.Issuer, "/") + KeysPath,
		SigningAlgs:   []string{string(jose.ES256)},
		ResponseTypes: []string{"id_token"},
		SubjectTypes:  []string{"public"},
	})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+DiscoveryPath, func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, doc)
	})
	mux.HandleFunc("GET "+KeysPath, func(w http.ResponseWriter, _ *http.Request) {
		body, err := json.Marshal(KeySet(o.Keys(), o.Now()))
		if err != nil {
			http.Error(w, "cannot encode keys", http.StatusInternalServerError)
			return
		}
		writeJSON(w, body)
	})
	return mux, nil
}

// KeySet is the standard JWKS of the keys still valid at now.
func KeySet(keys []cluster.JWTKey, now time.Time) jose.JSONWebKeySet {
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	for _, k := range keys {
		if !now.Before(k.NotAfter) {
			continue
		}
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.Public, KeyID: k.KeyID, Algorithm: string(jose.ES256), Use: "sig"})
	}
	return set
}

func writeJSON(w http.ResponseWriter, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", cacheMaxAge)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(body)
}
