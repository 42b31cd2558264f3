package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/x509util"
)

func BenchmarkMintX509SVID(b *testing.B) {
	a := newSelfManaged(b, b.TempDir(), newFakeClock(), nil)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.MintX509SVID(ctx, testID, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBareCreateCertificate is the floor for MintX509SVID: the same P-256
// keys and a comparable leaf template, signed with plain x509.CreateCertificate.
// "sign" reuses one leaf key; "keygen+sign+parse" does what a mint must do.
func BenchmarkBareCreateCertificate(b *testing.B) {
	a := newSelfManaged(b, b.TempDir(), newFakeClock(), nil)
	inter := a.inter
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	tmpl := func() *x509.Certificate {
		serial, _ := x509util.Serial()
		return &x509.Certificate{
			SerialNumber:          serial,
			Subject:               pkix.Name{Organization: []string{subjectOrg}},
			URIs:                  []*url.URL{testID.URL()},
			NotBefore:             now.Add(-backdate),
			NotAfter:              now.Add(time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
		}
	}
	b.Run("sign", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := x509.CreateCertificate(rand.Reader, tmpl(), inter.cert, &leafKey.PublicKey, inter.key); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("keygen+sign+parse", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				b.Fatal(err)
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl(), inter.cert, &k.PublicKey, inter.key)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := x509.ParseCertificate(der); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkMintJWTSVID(b *testing.B) {
	a := newSelfManaged(b, b.TempDir(), newFakeClock(), nil)
	ctx := context.Background()
	aud := []string{"api"}
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := a.MintJWTSVID(ctx, testID, aud); err != nil {
			b.Fatal(err)
		}
	}
}
