package oidc

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"
)

// certReload is how often the certificate files are read again, so a
// renewed certificate (cert-manager) is served without a restart.
const certReload = time.Minute

// TLSListener serves TLS on ln with the key pair in certFile and keyFile.
func TLSListener(ln net.Listener, certFile, keyFile string) (net.Listener, error) {
	kp := &keyPair{certFile: certFile, keyFile: keyFile}
	if _, err := kp.get(nil); err != nil {
		return nil, err
	}
	return tls.NewListener(ln, &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: kp.get}), nil
}

// keyPair is a certificate file read again at most every certReload.
type keyPair struct {
	certFile, keyFile string
	mu                sync.Mutex
	cert              *tls.Certificate
	read              time.Time
}

func (k *keyPair) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.cert != nil && time.Since(k.read) < certReload {
		return k.cert, nil
	}
	c, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err != nil {
		if k.cert != nil {
			// A pair half rewritten: keep serving the last good one.
			return k.cert, nil
		}
		return nil, fmt.Errorf("oidc: TLS key pair: %w", err)
	}
	k.cert, k.read = &c, time.Now()
	return k.cert, nil
}
