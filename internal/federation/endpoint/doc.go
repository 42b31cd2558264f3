// Package endpoint speaks the SPIFFE bundle endpoint protocol (SPIFFE
// Federation): Server serves our trust domain's bundle over HTTPS, Client
// fetches another trust domain's, in either profile of the spec: https_web
// (a Web PKI serving certificate) or https_spiffe (an X.509-SVID of the
// endpoint's trust domain). Judging what a fetched bundle says (its trust
// domain, its sequence) is the caller's: a Client only vouches for where
// the bytes came from.
package endpoint

// The profiles of the SPIFFE Federation spec.
const (
	ProfileHTTPSWeb    = "https_web"
	ProfileHTTPSSPIFFE = "https_spiffe"
)
