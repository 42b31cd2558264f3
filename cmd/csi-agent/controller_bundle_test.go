package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
	"github.com/csi-agent/csi-agent/internal/federation/endpoint"
)

// TestControllerBundleEndpoint runs controller.bundleEndpoint over a fake
// API: the served bundle is the ClusterTrustBundle's roots and the JWKS
// ConfigMap's keys, numbered by the objects' resourceVersions, on a standby
// (root read from the Secret) and on the leader (root held), with either
// profile.
func TestControllerBundleEndpoint(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	root, err := issue.Root(td, now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	webCA, certFile, keyFile := webServingCert(t)

	tests := []struct {
		name    string
		profile string
		leader  bool // the holder has the root; no Secret exists
	}{
		{name: "https_web", profile: endpoint.ProfileHTTPSWeb},
		{name: "https_spiffe on a standby", profile: endpoint.ProfileHTTPSSPIFFE},
		{name: "https_spiffe on the leader", profile: endpoint.ProfileHTTPSSPIFFE, leader: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be := config.BundleEndpoint{Address: "127.0.0.1:0", Profile: tt.profile}
			if tt.profile == endpoint.ProfileHTTPSWeb {
				be.CertFile, be.KeyFile = certFile, keyFile
			}
			cfg := config.Default()
			cfg.TrustDomain = td.Name()
			cfg.Controller.BundleEndpoint = be
			cfg.Controller = cfg.Controller.WithDefaults(func(string) string { return "" })
			if err := cfg.ValidateController(); err != nil {
				t.Fatal(err)
			}
			ns := cfg.Controller.Namespace

			key1 := jwtKey(t, "node-a")
			client := fake.NewClientset(
				&certv1.ClusterTrustBundle{
					ObjectMeta: metav1.ObjectMeta{Name: cluster.TrustBundleName(cluster.SVIDSigner, td), ResourceVersion: "120",
						Labels: map[string]string{cluster.TrustDomainLabel: td.Name()}},
					Spec: certv1.ClusterTrustBundleSpec{SignerName: cluster.SVIDSigner, TrustBundle: string(rootca.EncodeCertificates([]*x509.Certificate{root.Cert}))},
				},
				jwksConfigMap(t, ns, "135", key1),
			)
			holder := rootca.NewHolder(td, nil)
			if tt.leader {
				holder.Set(rootca.State{Current: root})
			} else {
				data, ann, err := rootca.State{Current: root}.Encode()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := client.CoreV1().Secrets(ns).Create(context.Background(), &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: cfg.Controller.RootSecret, Namespace: ns, Annotations: ann},
					Type:       corev1.SecretTypeTLS, Data: data,
				}, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}

			serve, ln, ready, err := controllerBundleEndpoint(cfg, td, client, holder)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- serve(ctx) }()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("serve: %v", err)
				}
			})

			copts := endpoint.ClientOptions{URL: "https://" + ln.Addr().String() + "/", Profile: tt.profile, Timeout: 5 * time.Second}
			if tt.profile == endpoint.ProfileHTTPSWeb {
				copts.Roots = webCA
			} else {
				copts.SPIFFEID = spiffeid.RequireFromPath(td, config.DefaultBundleEndpointID)
				copts.Bundle = x509bundle.FromX509Authorities(td, []*x509.Certificate{root.Cert})
			}
			c, err := endpoint.NewClient(copts)
			if err != nil {
				t.Fatal(err)
			}
			fetch := func(wantSeq uint64, wantKeys ...string) {
				t.Helper()
				var b *spiffebundle.Bundle
				var lastErr error
				for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
					if !ready() {
						continue
					}
					data, err := c.Fetch(ctx)
					if err != nil {
						lastErr = err
						continue
					}
					if b, err = spiffebundle.Parse(td, data); err != nil {
						t.Fatalf("served bundle: %v", err)
					}
					if seq, _ := b.SequenceNumber(); seq == wantSeq {
						break
					}
				}
				if b == nil {
					t.Fatalf("no bundle fetched: %v", lastErr)
				}
				if seq, ok := b.SequenceNumber(); !ok || seq != wantSeq {
					t.Fatalf("spiffe_sequence %d (%v), want %d", seq, ok, wantSeq)
				}
				if x := b.X509Authorities(); len(x) != 1 || !x[0].Equal(root.Cert) {
					t.Errorf("X.509 authorities %d, want the ClusterTrustBundle's root", len(x))
				}
				if got := b.JWTAuthorities(); len(got) != len(wantKeys) {
					t.Errorf("JWT authorities %d, want %v", len(got), wantKeys)
				}
				for _, kid := range wantKeys {
					if !b.HasJWTAuthority(kid) {
						t.Errorf("JWT key %s not served", kid)
					}
				}
			}
			// The larger of the two objects' resourceVersions.
			fetch(135, key1.KeyID)

			key2 := jwtKey(t, "node-b")
			if _, err := client.CoreV1().ConfigMaps(ns).Update(ctx, jwksConfigMap(t, ns, "150", key1, key2), metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			fetch(150, key1.KeyID, key2.KeyID)
		})
	}
}

func jwtKey(t *testing.T, node string) cluster.JWTKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := cluster.KeyID(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return cluster.JWTKey{Node: node, KeyID: kid, Public: k.Public(), NotAfter: time.Now().Add(time.Hour).Truncate(time.Second)}
}

func jwksConfigMap(t *testing.T, ns, rv string, keys ...cluster.JWTKey) *corev1.ConfigMap {
	t.Helper()
	data, err := cluster.MarshalJWKS(keys)
	if err != nil {
		t.Fatal(err)
	}
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: cluster.JWKSConfigMap, Namespace: ns, ResourceVersion: rv},
		Data:       map[string]string{cluster.JWKSKey: string(data)},
	}
}

// webServingCert is a test CA and a serving certificate for 127.0.0.1 it
// signed, written as PEM files (https_web).
func webServingCert(t *testing.T) (roots *x509.CertPool, certFile, keyFile string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "bundle endpoint"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	for path, block := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	roots = x509.NewCertPool()
	roots.AddCert(caCert)
	return roots, certFile, keyFile
}
