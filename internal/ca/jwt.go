package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MintJWTSVID signs a JWT-SVID (ES256) for id with the given audience.
func (a *Authority) MintJWTSVID(ctx context.Context, id spiffeid.ID, audience []string) (string, time.Time, error) {
	if err := ctx.Err(); err != nil {
		return "", time.Time{}, err
	}
	if err := a.checkID(id); err != nil {
		return "", time.Time{}, err
	}
	if err := checkAudience(audience); err != nil {
		return "", time.Time{}, err
	}
	jti, err := randomID()
	if err != nil {
		return "", time.Time{}, err
	}
	now := a.now()
	expires := now.Add(a.jwtTTL)
	a.mu.RLock()
	signer := a.jwtSigner
	if a.cluster != nil {
		var k heldJWTKey
		k, err = a.signingJWTKeyLocked(now)
		// No token outlives its key's place in the published JWKS.
		signer, expires = k.signer, earlier(expires, k.notAfter)
	}
	a.mu.RUnlock()
	if err != nil {
		return "", time.Time{}, err
	}
	exp := jwt.NewNumericDate(expires)
	claims := jwt.Claims{
		Issuer:   a.jwtIssuer,
		Subject:  id.String(),
		Audience: jwt.Audience(audience),
		Expiry:   exp,
		IssuedAt: jwt.NewNumericDate(now),
		ID:       jti,
	}
	token, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		return "", time.Time{}, fmt.Errorf("ca: sign JWT-SVID for %s: %w", id, err)
	}
	return token, exp.Time(), nil
}

// checkAudience requires at least one non-empty audience. Invalid UTF-8 is
// refused because JSON encoding would silently replace it.
func checkAudience(audience []string) error {
	if len(audience) == 0 {
		return errors.New("ca: JWT-SVID audience is required")
	}
	for _, aud := range audience {
		if aud == "" {
			return errors.New("ca: JWT-SVID audience must not contain an empty value")
		}
		if !utf8.ValidString(aud) {
			return fmt.Errorf("ca: JWT-SVID audience %q is not valid UTF-8", aud)
		}
	}
	return nil
}

// keyID names a public key: base64url of the first 16 bytes of the SHA-256
// of its SubjectPublicKeyInfo. Stable for a key, so bundles stay equal.
func keyID(pub *ecdsa.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:16]), nil
}

// newJWTSigner returns the key id of key and a signer with it.
func newJWTSigner(key *ecdsa.PrivateKey) (kid string, signer jose.Signer, err error) {
	kid, err = keyID(&key.PublicKey)
	if err != nil {
		return "", nil, fmt.Errorf("ca: JWT-SVID key id: %w", err)
	}
	signer, err = jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"),
	)
	if err != nil {
		return "", nil, fmt.Errorf("ca: JWT-SVID signer: %w", err)
	}
	return kid, signer, nil
}

func randomID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("ca: random token id: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
