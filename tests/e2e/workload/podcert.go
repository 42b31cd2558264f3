package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// podCert watches a kubelet podCertificate credential bundle (PKCS#8 key,
// then the chain) and reports every new certificate, verified against the
// roots of a clusterTrustBundle projection; with --dial it then holds an
// mTLS handshake with that SVID against a Workload API server
// (mtls-serve), reporting the server's ID.
//
//	workload podcert --bundle FILE --trust FILE [--dial ADDR]
func podCert(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("podcert", flag.ContinueOnError)
	bundlePath := fs.String("bundle", "", "credential bundle of a podCertificate projection")
	trustPath := fs.String("trust", "", "PEM roots of a clusterTrustBundle projection")
	dial := fs.String("dial", "", "address of an mtls-serve to handshake with")
	if err := fs.Parse(args); err != nil {
		return err
	}
	emit(Event{Event: "start"})
	var last, lastErr string
	dialed := false
	for {
		svid, err := readCredentialBundle(*bundlePath, *trustPath)
		switch {
		case err != nil && err.Error() != lastErr:
			lastErr = err.Error()
			emit(Event{Event: "error", Error: lastErr})
		case err == nil:
			leaf := svid.Certificates[0]
			if serial := leaf.SerialNumber.Text(16); serial != last {
				last = serial
				emit(Event{Event: "podcert", IDs: []string{svid.ID.String()}, Serials: []string{serial},
					NotAfter: []string{leaf.NotAfter.UTC().Format(time.RFC3339)}, Verified: true})
			}
			if *dial != "" && !dialed {
				dialed = dialMTLS(ctx, *dial, svid, *trustPath)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// readCredentialBundle parses the bundle and verifies its chain to the
// trust file's roots as an X.509-SVID.
func readCredentialBundle(bundlePath, trustPath string) (*x509svid.SVID, error) {
	data, err := os.ReadFile(bundlePath)
	if err != nil {
		return nil, err
	}
	var keyDER []byte
	var certs bytes.Buffer
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		switch b.Type {
		case "PRIVATE KEY":
			keyDER = b.Bytes
		case "CERTIFICATE":
			_ = pem.Encode(&certs, b)
		}
	}
	if keyDER == nil || certs.Len() == 0 {
		return nil, fmt.Errorf("%s: want a PRIVATE KEY and CERTIFICATE blocks", bundlePath)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	svid, err := x509svid.Parse(certs.Bytes(), keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", bundlePath, err)
	}
	roots, err := trustBundle(trustPath, svid)
	if err != nil {
		return nil, err
	}
	if _, _, err := x509svid.Verify(svid.Certificates, roots); err != nil {
		return nil, fmt.Errorf("%s does not verify against %s: %w", bundlePath, trustPath, err)
	}
	return svid, nil
}

// trustBundle reads the projected roots as the bundle of svid's trust domain.
func trustBundle(path string, svid *x509svid.SVID) (*x509bundle.Bundle, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, err := x509bundle.Parse(svid.ID.TrustDomain(), data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// dialMTLS handshakes as svid with addr, trusting the projected roots, and
// reports the server's SPIFFE ID; false means "try again".
func dialMTLS(ctx context.Context, addr string, svid *x509svid.SVID, trustPath string) bool {
	roots, err := trustBundle(trustPath, svid)
	if err != nil {
		emit(Event{Event: "mtls-error", Error: err.Error()})
		return false
	}
	// Any server of the trust domain; the e2e checks which one it was.
	var peer string
	cfg := tlsconfig.MTLSClientConfig(svid, roots, func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		peer = id.String()
		return nil
	})
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		emit(Event{Event: "mtls-error", Error: err.Error()})
		return false
	}
	defer conn.Close()
	emit(Event{Event: "mtls", IDs: []string{peer}, Verified: true})
	return true
}

// mtlsServe serves TLS on addr with the Workload API's X.509-SVID,
// requiring and verifying client SVIDs with the Workload API's bundle, and
// reports every client's SPIFFE ID.
//
//	workload mtls-serve --addr ADDR
func mtlsServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("mtls-serve", flag.ContinueOnError)
	addr := fs.String("addr", "", "listen address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	emit(Event{Event: "start"})
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return err
	}
	defer source.Close()
	cfg := tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeAny())
	ln, err := tls.Listen("tcp", *addr, cfg)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		_ = ln.Close()
	}()
	emit(Event{Event: "listening"})
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go func() {
			defer conn.Close()
			tc := conn.(*tls.Conn)
			_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
			if err := tc.HandshakeContext(ctx); err != nil {
				emit(Event{Event: "mtls-error", Error: err.Error()})
				return
			}
			id, err := x509svid.IDFromCert(tc.ConnectionState().PeerCertificates[0])
			if err != nil {
				emit(Event{Event: "mtls-error", Error: err.Error()})
				return
			}
			emit(Event{Event: "mtls", IDs: []string{id.String()}, Verified: true})
		}()
	}
}
