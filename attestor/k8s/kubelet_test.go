package k8s

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), InsecureSkipVerify: true, SendTokenUnverified: true, TokenFile: tokenFile})
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
		{"skip-verify with a token, not allowed", KubeletConfig{InsecureSkipVerify: true, TokenFile: token}, "would send the token"},
		{"token-unverified without skip-verify", KubeletConfig{SendTokenUnverified: true, TokenFile: token}, "only applies with skip-verify"},
		{"read-only with token-unverified", KubeletConfig{ReadOnlyPort: 10255, InsecureSkipVerify: true, SendTokenUnverified: true}, "read-only"},
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

// impostor takes the kubelet's port the way any host-network process can
// while the kubelet is down, and keeps every byte a client sends it after
// the TLS handshake.
type impostor struct {
	l  net.Listener
	wg sync.WaitGroup

	mu  sync.Mutex
	got []byte
}

func startImpostor(t *testing.T, cert tls.Certificate) *impostor {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	im := &impostor{l: l}
	im.wg.Add(1)
	go func() {
		defer im.wg.Done()
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			im.wg.Add(1)
			go func() {
				defer im.wg.Done()
				im.serve(conn.(*tls.Conn))
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		im.wg.Wait()
	})
	return im
}

func (im *impostor) serve(conn *tls.Conn) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := conn.Handshake(); err != nil {
		return
	}
	var req []byte
	buf := make([]byte, 4096)
	for !bytes.Contains(req, []byte("\r\n\r\n")) {
		n, err := conn.Read(buf)
		req = append(req, buf[:n]...)
		if err != nil {
			break
		}
	}
	im.mu.Lock()
	im.got = append(im.got, req...)
	im.mu.Unlock()
	io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{\"items\":[]}")
}

func (im *impostor) port() int { return im.l.Addr().(*net.TCPAddr).Port }

func (im *impostor) received() []byte {
	im.mu.Lock()
	defer im.mu.Unlock()
	return append([]byte(nil), im.got...)
}

// The finding this guards: with the verified default, a process that took
// the kubelet's port gets nothing, token least of all, whatever
// certificate it shows.
func TestKubeletTokenNeverSentToUnverifiedPeer(t *testing.T) {
	kubeletCA := newTestCA(t, "kubelet-ca")
	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.crt", kubeletCA.pem)
	const secret = "secret-token-1"
	tokenFile := writeFile(t, dir, "token", []byte(secret))
	_, _, clientCert := kubeletCA.issue(t, "node-a", x509.ExtKeyUsageClientAuth, []string{"node-a"}, loopback)

	for _, tc := range []struct {
		name   string
		cert   tls.Certificate
		caFile string
	}{
		{"certificate from an unknown CA", newTestCA(t, "attacker").serving(t, []string{"node-a"}, loopback), caFile},
		{"the right CA, another node's certificate", kubeletCA.serving(t, []string{"node-b"}, nil), caFile},
		{"the right CA, a client certificate for the node", clientCert, caFile},
		{"system roots and a private certificate", kubeletCA.serving(t, []string{"node-a"}, loopback), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := startImpostor(t, tc.cert)
			c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: im.port(), CAFile: tc.caFile, TokenFile: tokenFile})
			_, err := c.ListPods(context.Background())
			if !errors.Is(err, attestor.ErrUnavailable) || !strings.Contains(err.Error(), "verify kubelet certificate") {
				t.Fatalf("err = %v, want Unavailable from certificate verification", err)
			}
			c.Close()
			if got := im.received(); len(got) != 0 {
				t.Fatalf("the impostor received %d bytes (token included: %v)", len(got), bytes.Contains(got, []byte(secret)))
			}
		})
	}

	// Skipping verification with a token is refused unless asked for twice.
	im := startImpostor(t, newTestCA(t, "attacker").serving(t, []string{"node-a"}, loopback))
	if _, err := NewKubeletClient(testKubelet(KubeletConfig{NodeName: "node-a", Port: im.port(), InsecureSkipVerify: true, TokenFile: tokenFile})); err == nil {
		t.Fatal("skip-verify with a token was accepted without SendTokenUnverified")
	}
	// A client certificate alone needs no such opt-in: nothing replayable is sent.
	certPEM, keyPEM, _ := kubeletCA.issue(t, "agent", x509.ExtKeyUsageClientAuth, nil, nil)
	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: im.port(), InsecureSkipVerify: true,
		ClientCertFile: writeFile(t, dir, "client.crt", certPEM), ClientKeyFile: writeFile(t, dir, "client.key", keyPEM)})
	if _, err := c.ListPods(context.Background()); err != nil {
		t.Fatalf("skip-verify with a client certificate: %v", err)
	}
	if got := im.received(); bytes.Contains(bytes.ToLower(got), []byte("authorization")) {
		t.Fatalf("certificate-only client sent an Authorization header: %q", got)
	}
	// And the explicit opt-in does what it says: the impostor gets the token.
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: im.port(), InsecureSkipVerify: true, SendTokenUnverified: true, TokenFile: tokenFile})
	if _, err := c.ListPods(context.Background()); err != nil {
		t.Fatalf("explicit opt-in: %v", err)
	}
	if got := im.received(); !bytes.Contains(got, []byte("Bearer "+secret)) {
		t.Fatalf("explicit opt-in: the impostor saw %q, want the token", got)
	}
}

// A kubelet without a CA-signed serving certificate writes a self-signed
// one to <root-dir>/pki/kubelet.crt (kubeadm's and kind's default): the
// certificate followed by the throwaway CA that signed it. Used as the CA
// file it pins that kubelet, and only it.
func TestKubeletClientPinsSelfSignedKubeletCert(t *testing.T) {
	selfCA := newTestCA(t, "node-a-ca@1700000000")
	leafPEM, keyPEM, _ := selfCA.issue(t, "node-a@1700000000", x509.ExtKeyUsageServerAuth, []string{"node-a"}, nil)
	dir := t.TempDir()
	kubeletCrt := writeFile(t, dir, "kubelet.crt", append(append([]byte(nil), leafPEM...), selfCA.pem...))
	pair, err := tls.X509KeyPair(leafPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	k := startKubelet(t, standInOptions{tls: &tls.Config{Certificates: []tls.Certificate{pair}}, token: "token-1"})
	k.setPods(withContainer(newPod("shop", "web", uidN(1), "web-sa"), "app", "nginx:1.27", cidN(1)))
	tokenFile := writeFile(t, dir, "token", []byte("token-1"))

	c := mustClient(t, KubeletConfig{NodeName: "node-a", Port: k.port(), CAFile: kubeletCrt, TokenFile: tokenFile})
	listOK(t, c)

	// Another process on the port with its own self-signed certificate for
	// the same node name does not pass.
	otherCA := newTestCA(t, "node-a-ca@1700000001")
	im := startImpostor(t, otherCA.serving(t, []string{"node-a"}, nil))
	c = mustClient(t, KubeletConfig{NodeName: "node-a", Port: im.port(), CAFile: kubeletCrt, TokenFile: tokenFile})
	var unknown x509.UnknownAuthorityError
	if _, err := c.ListPods(context.Background()); !errors.As(err, &unknown) {
		t.Fatalf("err = %v, want unknown authority", err)
	}
	if got := im.received(); len(got) != 0 {
		t.Fatalf("the impostor received %q", got)
	}
}
