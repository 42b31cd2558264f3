package k8s

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/attestor"
)

var loopback = []net.IP{net.ParseIP("127.0.0.1")}

// secureKubelet starts a TLS stand-in whose certificate names node-a (and
// 127.0.0.1 when withIP), and returns it with a CA file and token file.
func secureKubelet(t *testing.T, withIP bool) (k *kubeletStandIn, caFile, tokenFile string) {
	t.Helper()
	ca := newTestCA(t, "kubelet-ca")
	var ips []net.IP
	if withIP {
		ips = loopback
	}
	serving := ca.serving(t, []string{"node-a"}, ips)
	k = startKubelet(t, standInOptions{
		tls:   &tls.Config{Certificates: []tls.Certificate{serving}},
		token: "token-1",
	})
	k.setPods(withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1)))
	dir := t.TempDir()
	return k, writeFile(t, dir, "ca.crt", ca.pem), writeFile(t, dir, "token", []byte("token-1\n"))
}

// testKubelet fills what internal/config would: the loopback host, the
// secure port and a request timeout.
func testKubelet(cfg KubeletConfig) KubeletConfig {
	if cfg.Port == 0 && cfg.ReadOnlyPort == 0 {
		cfg.Port = 10250
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	return cfg
}

func mustClient(t *testing.T, cfg KubeletConfig) *KubeletClient {
	t.Helper()
	c, err := NewKubeletClient(testKubelet(cfg))
	if err != nil {
		t.Fatalf("NewKubeletClient: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

func listOK(t *testing.T, c *KubeletClient) []byte {
	t.Helper()
	body, err := c.ListPods(context.Background())
	if err != nil {
		t.Fatalf("ListPods: %v", err)
	}
	l, err := parsePodList(body)
	if err != nil {
		t.Fatal(err)
	}
	if l.byUID[uidN(1)] == nil {
		t.Fatalf("pod list lacks the stand-in's pod: %s", body)
	}
	return body
}

func TestKubeletClientBearerToken(t *testing.T) {
	k, caFile, tokenFile := secureKubelet(t, true)
	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: tokenFile})
	listOK(t, c)
	if auth, _ := k.seen(); auth != "Bearer token-1" {
		t.Fatalf("Authorization = %q", auth)
	}

	// Rotation by rewrite in place.
	k.setToken("token-2")
	if _, err := c.ListPods(context.Background()); !errors.Is(err, attestor.ErrUnavailable) || !strings.Contains(err.Error(), "401") {
		t.Fatalf("stale token: err = %v, want Unavailable with 401", err)
	}
	if err := os.WriteFile(tokenFile, []byte("token-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	listOK(t, c)
	if auth, _ := k.seen(); auth != "Bearer token-2" {
		t.Fatalf("after rewrite Authorization = %q", auth)
	}

	// Rotation the way projected volumes do it: a symlink swapped atomically.
	dir := t.TempDir()
	writeFile(t, dir, "token-3", []byte("token-3"))
	link := filepath.Join(dir, "token")
	if err := os.Symlink("token-3", link+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link+".tmp", link); err != nil {
		t.Fatal(err)
	}
	c2 := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: link})
	k.setToken("token-3")
	listOK(t, c2)
	writeFile(t, dir, "token-4", []byte("token-4"))
	if err := os.Symlink("token-4", link+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link+".tmp", link); err != nil {
		t.Fatal(err)
	}
	k.setToken("token-4")
	listOK(t, c2)
	if auth, _ := k.seen(); auth != "Bearer token-4" {
		t.Fatalf("after symlink swap Authorization = %q", auth)
	}
}

func TestKubeletClientVerifiesCA(t *testing.T) {
	k, _, tokenFile := secureKubelet(t, true)
	other := newTestCA(t, "someone-else")
	wrongCA := writeFile(t, t.TempDir(), "ca.crt", other.pem)

	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: wrongCA, TokenFile: tokenFile})
	_, err := c.ListPods(context.Background())
	var unknown x509.UnknownAuthorityError
	if !errors.Is(err, attestor.ErrUnavailable) || !errors.As(err, &unknown) {
		t.Fatalf("err = %v, want Unavailable caused by an unknown authority", err)
	}
	if k.requests.Load() != 0 {
		t.Fatal("request reached a kubelet whose certificate did not verify")
	}

	// The same kubelet with skip-verify asked for explicitly.
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), InsecureSkipVerify: true, TokenFile: tokenFile})
	listOK(t, c)

	// System roots (no CA file) do not trust a private kubelet CA.
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), TokenFile: tokenFile})
	if _, err := c.ListPods(context.Background()); !errors.Is(err, attestor.ErrUnavailable) || !errors.As(err, &unknown) {
		t.Fatalf("system roots: err = %v, want unknown authority", err)
	}
}

func TestKubeletClientCARotation(t *testing.T) {
	k, caFile, tokenFile := secureKubelet(t, false)
	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: tokenFile})
	listOK(t, c)

	// The kubelet restarts with a certificate from a new CA; the CA file is
	// updated; the same client follows without being recreated.
	newCA := newTestCA(t, "kubelet-ca-2")
	k.stop()
	k.setTLS(&tls.Config{Certificates: []tls.Certificate{newCA.serving(t, []string{"node-a"}, nil)}})
	k.restart()
	var unknown x509.UnknownAuthorityError
	if _, err := c.ListPods(context.Background()); !errors.Is(err, attestor.ErrUnavailable) || !errors.As(err, &unknown) {
		t.Fatalf("old CA against new kubelet cert: err = %v, want Unavailable with unknown authority", err)
	}
	if err := os.WriteFile(caFile, newCA.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	listOK(t, c)
}

func TestKubeletClientServerNameIsNodeName(t *testing.T) {
	// The serving certificate names only the node, not 127.0.0.1.
	k, caFile, tokenFile := secureKubelet(t, false)

	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: tokenFile})
	if !strings.HasPrefix(c.URL(), "https://127.0.0.1:") {
		t.Fatalf("URL = %s, want the 127.0.0.1 fallback", c.URL())
	}
	listOK(t, c)

	for _, name := range []string{"node-b", ""} {
		c := mustClient(t, KubeletConfig{NodeName: name, Port: k.port(), CAFile: caFile, TokenFile: tokenFile})
		_, err := c.ListPods(context.Background())
		var hostErr x509.HostnameError
		if !errors.Is(err, attestor.ErrUnavailable) || !errors.As(err, &hostErr) {
			t.Fatalf("node name %q: err = %v, want Unavailable with a hostname mismatch", name, err)
		}
	}
}

func TestKubeletClientCertificate(t *testing.T) {
	serverCA := newTestCA(t, "kubelet-ca")
	clientCA := newTestCA(t, "kubelet-client-ca")
	clientPool := x509.NewCertPool()
	clientPool.AddCert(clientCA.cert)
	k := startKubelet(t, standInOptions{tls: &tls.Config{
		Certificates: []tls.Certificate{serverCA.serving(t, []string{"node-a"}, nil)},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientPool,
	}})
	k.setPods(withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1)))

	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.crt", serverCA.pem)
	certPEM, keyPEM, _ := clientCA.issue(t, "agent-1", x509.ExtKeyUsageClientAuth, nil, nil)
	certFile := writeFile(t, dir, "client.crt", certPEM)
	keyFile := writeFile(t, dir, "client.key", keyPEM)

	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, ClientCertFile: certFile, ClientKeyFile: keyFile})
	listOK(t, c)
	auth, cns := k.seen()
	if auth != "" {
		t.Fatalf("certificate-only client sent Authorization %q", auth)
	}
	if len(cns) != 1 || cns[0] != "agent-1" {
		t.Fatalf("client certificates seen = %v", cns)
	}

	// Rotation: new pair on disk, used from the next request on.
	certPEM, keyPEM, _ = clientCA.issue(t, "agent-2", x509.ExtKeyUsageClientAuth, nil, nil)
	writeFile(t, dir, "client.key", keyPEM)
	writeFile(t, dir, "client.crt", certPEM)
	listOK(t, c)
	if _, cns := k.seen(); cns[len(cns)-1] != "agent-2" {
		t.Fatalf("after rotation the kubelet saw %v", cns)
	}

	// A half-written rotation (certificate without its key) keeps the last good pair.
	other, _, _ := clientCA.issue(t, "agent-3", x509.ExtKeyUsageClientAuth, nil, nil)
	writeFile(t, dir, "client.crt", other)
	listOK(t, c)

	// Without a certificate the kubelet refuses the handshake.
	tokenFile := writeFile(t, dir, "token", []byte("t"))
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: tokenFile})
	if _, err := c.ListPods(context.Background()); !errors.Is(err, attestor.ErrUnavailable) {
		t.Fatalf("no client certificate: err = %v, want Unavailable", err)
	}
}

func TestKubeletClientAnonymous(t *testing.T) {
	k, caFile, _ := secureKubelet(t, false)
	k.setToken("")
	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, Anonymous: true})
	listOK(t, c)
	if auth, cns := k.seen(); auth != "" || len(cns) != 0 {
		t.Fatalf("anonymous client sent Authorization %q, certificates %v", auth, cns)
	}
}

func TestKubeletClientReadOnlyPort(t *testing.T) {
	k := startKubelet(t, standInOptions{}) // plain HTTP, no token
	k.setPods(withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1)))
	c := mustClient(t, KubeletConfig{NodeName: "node-a", ReadOnlyPort: k.port()})
	if !strings.HasPrefix(c.URL(), "http://127.0.0.1:") {
		t.Fatalf("URL = %s", c.URL())
	}
	listOK(t, c)
	if auth, _ := k.seen(); auth != "" {
		t.Fatalf("read-only port got Authorization %q", auth)
	}
}

func TestKubeletClientErrorsAreUnavailable(t *testing.T) {
	k, caFile, tokenFile := secureKubelet(t, true)
	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: caFile, TokenFile: tokenFile})

	k.setStatus(http.StatusInternalServerError)
	_, err := c.ListPods(context.Background())
	if !errors.Is(err, attestor.ErrUnavailable) || !strings.Contains(err.Error(), "500") {
		t.Fatalf("HTTP 500: err = %v", err)
	}
	k.setStatus(0)

	k.stop()
	_, err = c.ListPods(context.Background())
	if !errors.Is(err, attestor.ErrUnavailable) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("kubelet down: err = %v", err)
	}
	k.restart()
	listOK(t, c)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err = c.ListPods(ctx); !errors.Is(err, attestor.ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled: err = %v", err)
	}

	if err := os.Remove(tokenFile); err != nil {
		t.Fatal(err)
	}
	if _, err = c.ListPods(context.Background()); !errors.Is(err, attestor.ErrUnavailable) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("token file gone: err = %v", err)
	}

}

func TestNewKubeletClientRejectsBadConfig(t *testing.T) {
	dir := t.TempDir()
	token := writeFile(t, dir, "token", []byte("t"))
	empty := writeFile(t, dir, "empty", nil)
	notPEM := writeFile(t, dir, "ca.crt", []byte("not a certificate"))
	ca := writeFile(t, dir, "good-ca.crt", newTestCA(t, "ca").pem)
	tests := []struct {
		name string
		cfg  KubeletConfig
		want string
	}{
		{"port out of range", KubeletConfig{Port: 70000, TokenFile: token}, "out of range"},
		{"read-only port out of range", KubeletConfig{ReadOnlyPort: -1}, "out of range"},
		{"cert without key", KubeletConfig{ClientCertFile: token}, "together"},
		{"ca and skip-verify", KubeletConfig{CAFile: ca, InsecureSkipVerify: true, TokenFile: token}, "exclude"},
		{"anonymous with token", KubeletConfig{Anonymous: true, TokenFile: token}, "anonymous"},
		{"read-only with token", KubeletConfig{ReadOnlyPort: 10255, TokenFile: token}, "read-only"},
		{"missing token file", KubeletConfig{TokenFile: filepath.Join(dir, "absent")}, "no such file"},
		{"empty token file", KubeletConfig{TokenFile: empty}, "empty"},
		{"CA file without certificates", KubeletConfig{CAFile: notPEM, TokenFile: token}, "no PEM certificate"},
		{"unreadable key pair", KubeletConfig{ClientCertFile: token, ClientKeyFile: token}, "client certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewKubeletClient(testKubelet(tt.cfg))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}
