package k8s

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// testCA issues certificates for the kubelet stand-in and for clients.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

var serial atomic.Int64

// issue returns a leaf's PEM certificate and key, and the parsed pair.
func (ca *testCA) issue(t testing.TB, cn string, usage x509.ExtKeyUsage, dnsNames []string, ips []net.IP) (certPEM, keyPEM []byte, pair tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + serial.Add(1)),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	pair, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM, pair
}

func (ca *testCA) serving(t testing.TB, dnsNames []string, ips []net.IP) tls.Certificate {
	_, _, pair := ca.issue(t, "kubelet", x509.ExtKeyUsageServerAuth, dnsNames, ips)
	return pair
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// kubeletStandIn serves GET /pods like a kubelet, from k8s.io/api objects,
// over real TLS (or plain HTTP for the read-only port) on 127.0.0.1.
type kubeletStandIn struct {
	t        testing.TB
	tls      *tls.Config // nil: plain HTTP
	addr     string
	requests atomic.Int64

	mu         sync.Mutex
	srv        *httptest.Server
	token      string // "" accepts any or none
	pods       []corev1.Pod
	body       []byte
	lastAuth   string
	clientCNs  []string
	statusCode int
}

type standInOptions struct {
	tls   *tls.Config
	token string
}

func startKubelet(t testing.TB, opts standInOptions) *kubeletStandIn {
	t.Helper()
	k := &kubeletStandIn{t: t, tls: opts.tls, token: opts.token}
	k.setPods()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	k.addr = l.Addr().String()
	k.serve(l)
	t.Cleanup(k.stop)
	return k
}

func (k *kubeletStandIn) serve(l net.Listener) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(k.handle))
	srv.Listener.Close()
	srv.Listener = l
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are what some tests want
	if k.tls != nil {
		srv.TLS = k.tls.Clone()
		srv.StartTLS()
	} else {
		srv.Start()
	}
	k.mu.Lock()
	k.srv = srv
	k.mu.Unlock()
}

func (k *kubeletStandIn) port() int {
	_, p, _ := net.SplitHostPort(k.addr)
	var n int
	fmt.Sscan(p, &n)
	return n
}

// stop closes the listener: the kubelet is down, connections are refused.
func (k *kubeletStandIn) stop() {
	k.mu.Lock()
	srv := k.srv
	k.srv = nil
	k.mu.Unlock()
	if srv != nil {
		srv.CloseClientConnections()
		srv.Close()
	}
}

// restart listens again on the same address.
func (k *kubeletStandIn) restart() {
	k.t.Helper()
	var l net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", k.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		k.t.Fatalf("relisten on %s: %v", k.addr, err)
	}
	k.serve(l)
}

func (k *kubeletStandIn) setTLS(c *tls.Config) { k.tls = c }

func (k *kubeletStandIn) setToken(tok string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.token = tok
}

func (k *kubeletStandIn) setStatus(code int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.statusCode = code
}

func (k *kubeletStandIn) setPods(pods ...corev1.Pod) {
	body, err := json.Marshal(corev1.PodList{
		TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"},
		Items:    pods,
	})
	if err != nil {
		k.t.Fatal(err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pods = pods
	k.body = body
}

func (k *kubeletStandIn) addPods(pods ...corev1.Pod) {
	k.mu.Lock()
	all := append(append([]corev1.Pod(nil), k.pods...), pods...)
	k.mu.Unlock()
	k.setPods(all...)
}

func (k *kubeletStandIn) seen() (auth string, clientCNs []string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.lastAuth, append([]string(nil), k.clientCNs...)
}

func (k *kubeletStandIn) handle(w http.ResponseWriter, r *http.Request) {
	k.requests.Add(1)
	k.mu.Lock()
	k.lastAuth = r.Header.Get("Authorization")
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		k.clientCNs = append(k.clientCNs, r.TLS.PeerCertificates[0].Subject.CommonName)
	}
	token, body, code := k.token, k.body, k.statusCode
	k.mu.Unlock()
	if r.Method != http.MethodGet || r.URL.Path != "/pods" {
		http.NotFound(w, r)
		return
	}
	if token != "" && r.Header.Get("Authorization") != "Bearer "+token {
		http.Error(w, "Unauthorized", http.StatusUnauthorized)
		return
	}
	if code != 0 {
		http.Error(w, "kubelet is unwell", code)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

// Pod builders.

func newPod(ns, name, uid, sa string) corev1.Pod {
	return corev1.Pod{
		TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Name:      name,
			UID:       types.UID(uid),
			Labels:    map[string]string{"app": name},
		},
		Spec: corev1.PodSpec{
			NodeName:           "node-a",
			ServiceAccountName: sa,
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning},
	}
}

// withContainer adds a running regular container; id "" models a container
// whose ID the kubelet has not reported yet (postStart hook running).
func withContainer(p corev1.Pod, name, image, id string) corev1.Pod {
	p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: name, Image: image})
	p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, containerStatusFor(name, image, id))
	return p
}

func withInit(p corev1.Pod, name, image, id string, sidecar bool) corev1.Pod {
	c := corev1.Container{Name: name, Image: image}
	if sidecar {
		always := corev1.ContainerRestartPolicyAlways
		c.RestartPolicy = &always
	}
	p.Spec.InitContainers = append(p.Spec.InitContainers, c)
	p.Status.InitContainerStatuses = append(p.Status.InitContainerStatuses, containerStatusFor(name, image, id))
	return p
}

func withEphemeral(p corev1.Pod, name, image, id string) corev1.Pod {
	p.Spec.EphemeralContainers = append(p.Spec.EphemeralContainers, corev1.EphemeralContainer{
		EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: name, Image: image},
	})
	p.Status.EphemeralContainerStatuses = append(p.Status.EphemeralContainerStatuses, containerStatusFor(name, image, id))
	return p
}

func containerStatusFor(name, image, id string) corev1.ContainerStatus {
	s := corev1.ContainerStatus{
		Name:  name,
		Image: "docker.io/library/" + image,
	}
	if id == "" {
		s.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
		return s
	}
	s.ContainerID = "containerd://" + id
	s.ImageID = "docker.io/library/" + strings.Split(image, ":")[0] + "@sha256:" + strings.Repeat("ab", 32)
	s.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.Now()}
	return s
}

func withOwner(p corev1.Pod, kind, name, uid string) corev1.Pod {
	yes := true
	p.OwnerReferences = append(p.OwnerReferences,
		metav1.OwnerReference{APIVersion: "v1", Kind: "ConfigMap", Name: "not-the-controller", UID: "00000000-0000-0000-0000-000000000001"},
		metav1.OwnerReference{APIVersion: "apps/v1", Kind: kind, Name: name, UID: types.UID(uid), Controller: &yes},
	)
	return p
}

// uidN and cidN make distinct well-formed pod UIDs and container IDs.
func uidN(n int) string { return fmt.Sprintf("%08x-0000-4000-8000-%012x", n, n) }
func cidN(n int) string { return fmt.Sprintf("%064x", 0xc0000000+n) }
