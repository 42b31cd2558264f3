package federation

import (
	"testing"
)

// FuzzParseBundle feeds file contents to both formats: a bundle file is
// written by whoever manages the ConfigMap, and a bundle endpoint's
// document by another trust domain, so both are untrusted input.
func FuzzParseBundle(f *testing.F) {
	ca := newCA(f, partner, 1)
	f.Add(pemOf(ca))
	f.Add(jwksOf(f, partner, ca, "k"))
	f.Add(jwksOf(f, other, newCA(f, other, 2), "k")) // another trust domain's CA
	f.Add([]byte(`{"keys":[],"spiffe_sequence":18446744073709551615,"spiffe_refresh_hint":-1}`))
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":[{"use":"x509-svid","kty":"EC","x5c":[]}]}`))
	f.Add([]byte(`{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}`))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, format := range []string{FormatSPIFFE, FormatPEM} {
			b, err := parse(partner, format, data)
			if err != nil {
				continue
			}
			if b.TrustDomain() != partner {
				t.Fatalf("%s bundle for %q", format, b.TrustDomain())
			}
			if len(b.X509Authorities()) == 0 && len(b.JWTAuthorities()) == 0 {
				t.Fatalf("%s bundle accepted without authorities", format)
			}
		}
	})
}
