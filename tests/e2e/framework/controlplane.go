package framework

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// ControlPlaneOptions configure etcd and kube-apiserver on loopback.
type ControlPlaneOptions struct {
	Base          string // every file lives here; removed by Stop
	APIServerPort int    // default 6443
	EtcdPort      int    // client port, default 12379; peer +1, metrics +2
	ToolsDir      string // module pinning k8s.io/kubernetes (tests/e2e/tools)
	CacheDir      string // built Kubernetes binaries, by version
	// APIServerArgs are extra kube-apiserver flags (e.g. --runtime-config=...).
	APIServerArgs []string
	Logf          func(string, ...any)
}

// ControlPlane is etcd and kube-apiserver as host processes on loopback,
// without kubelet or controller-manager: Node objects are what the test
// creates. Authentication is by client certificates of one CA (UserConfig)
// and service-account tokens; authorization is Node,RBAC.
type ControlPlane struct {
	Rest       *rest.Config // admin (system:masters)
	Client     kubernetes.Interface
	Kubeconfig string // admin kubeconfig file
	CAFile     string // the cluster CA, which signs the API server's certificate
	Host       string // https://127.0.0.1:<port>
	Version    string // Kubernetes version of kube-apiserver

	opts          ControlPlaneOptions
	d             dirs
	ps            *procSet
	apiserverArgs []string
	standalone    bool // Stop tears down the base; Local does that itself
}

// StartControlPlane starts etcd and kube-apiserver under opts.Base, after
// stopping what a killed earlier run left there. On error the caller must
// still call Stop.
func StartControlPlane(ctx context.Context, opts ControlPlaneOptions) (*ControlPlane, error) {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	cp := &ControlPlane{opts: opts, d: newDirs(opts.Base), standalone: true}
	if err := Cleanup(opts.Base, "", opts.Logf); err != nil {
		return cp, fmt.Errorf("cleaning up an earlier run: %w", err)
	}
	if err := os.MkdirAll(opts.Base, 0o755); err != nil {
		return cp, err
	}
	// Recorded before anything starts: a cleanup then never mistakes this
	// base for a node's (no kubepods, no sysctls to restore).
	st := &state{Procs: map[string]ProcRecord{}, ControlPlaneOnly: true}
	if err := st.save(opts.Base); err != nil {
		return cp, err
	}
	cp.ps = &procSet{base: opts.Base, logs: cp.d.logs, st: st, running: map[string]*proc{}}
	if err := cp.preflight(); err != nil {
		return cp, err
	}
	for _, d := range []string{cp.d.etcd, cp.d.logs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return cp, err
		}
	}
	version, err := KubernetesVersion(opts.ToolsDir)
	if err != nil {
		return cp, err
	}
	_, apiserver, err := BuildKubernetes(ctx, opts.ToolsDir, opts.CacheDir, opts.Logf)
	if err != nil {
		return cp, err
	}
	st.APIServer = apiserver
	cp.Version = version
	if err := writePKI(cp.d.pki); err != nil {
		return cp, err
	}
	t0 := time.Now()
	if err := cp.start(ctx); err != nil {
		return cp, err
	}
	opts.Logf("control plane: etcd and kube-apiserver %s on %s (%.1fs)", version, cp.Host, time.Since(t0).Seconds())
	return cp, nil
}

func (cp *ControlPlane) ports() []int {
	if cp.opts.APIServerPort == 0 {
		cp.opts.APIServerPort = apiServerPort
	}
	if cp.opts.EtcdPort == 0 {
		cp.opts.EtcdPort = etcdPort
	}
	return []int{cp.opts.APIServerPort, cp.opts.EtcdPort, cp.opts.EtcdPort + 1, cp.opts.EtcdPort + 2}
}

func (cp *ControlPlane) preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("the control plane needs root")
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		return fmt.Errorf("etcd not installed (etcd-server; tests/e2e/run.sh installs it): %w", err)
	}
	return portsFree(cp.ports())
}

func portsFree(ports []int) error {
	for _, port := range ports {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			return fmt.Errorf("port %d is busy: %w", port, err)
		}
		l.Close()
	}
	return nil
}

// start runs etcd and kube-apiserver (certificates already in d.pki) and
// waits until the API server is ready.
func (cp *ControlPlane) start(ctx context.Context) error {
	ports := cp.ports()
	api, etcdc := ports[0], ports[1]
	u := func(port int) string { return fmt.Sprintf("http://127.0.0.1:%d", port) }
	if err := cp.ps.start("etcd", "etcd", "--name=e2e", "--data-dir="+cp.d.etcd,
		"--listen-client-urls="+u(etcdc), "--advertise-client-urls="+u(etcdc),
		"--listen-peer-urls="+u(etcdc+1), "--initial-advertise-peer-urls="+u(etcdc+1),
		"--initial-cluster=e2e="+u(etcdc+1), "--listen-metrics-urls="+u(etcdc+2),
		"--unsafe-no-fsync=true", "--log-level=warn"); err != nil {
		return err
	}
	pki := func(f string) string { return filepath.Join(cp.d.pki, f) }
	cp.apiserverArgs = append([]string{cp.ps.st.APIServer,
		fmt.Sprintf("--etcd-servers=%s", u(etcdc)),
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", api), "--advertise-address=127.0.0.1",
		"--tls-cert-file=" + pki("apiserver.crt"), "--tls-private-key-file=" + pki("apiserver.key"),
		"--client-ca-file=" + pki("ca.crt"),
		"--kubelet-client-certificate=" + pki("apiserver-kubelet-client.crt"), "--kubelet-client-key=" + pki("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + pki("ca.crt"), "--kubelet-preferred-address-types=Hostname",
		"--service-account-issuer=https://kubernetes.default.svc", "--api-audiences=https://kubernetes.default.svc",
		"--service-account-key-file=" + pki("sa.pub"), "--service-account-signing-key-file=" + pki("sa.key"),
		"--authorization-mode=Node,RBAC", "--allow-privileged=true", "--endpoint-reconciler-type=none",
		"--service-cluster-ip-range=10.96.0.0/24", "--enable-priority-and-fairness=false", "--profiling=false",
		"--cert-dir=" + pki("apiserver-generated"), "--v=1"}, cp.opts.APIServerArgs...)
	cp.Host = fmt.Sprintf("https://127.0.0.1:%d", api)
	cp.CAFile = pki("ca.crt")
	cp.Kubeconfig = cp.d.admin
	cp.Rest = &rest.Config{
		Host:            cp.Host,
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile, CertFile: pki("admin.crt"), KeyFile: pki("admin.key")},
		QPS:             100, Burst: 200,
	}
	if err := writeKubeconfig(cp.Kubeconfig, cp.Host, cp.CAFile, pki("admin.crt"), pki("admin.key")); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cp.Rest)
	if err != nil {
		return err
	}
	cp.Client = cs
	return cp.StartAPIServer(ctx)
}

// StopAPIServer stops kube-apiserver (etcd keeps running), for outages.
func (cp *ControlPlane) StopAPIServer() error {
	return cp.ps.stop("kube-apiserver", 15*time.Second)
}

// StartAPIServer starts kube-apiserver again with the same flags and waits
// until it is ready.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	if err := cp.ps.start("kube-apiserver", cp.apiserverArgs...); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		for _, c := range []string{"etcd", "kube-apiserver"} {
			if err := cp.ps.exited(c); err != nil {
				return false, err
			}
		}
		body, err := cp.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	})
}

// Stop stops every process it started (also those of StartProcess) and
// removes the base directory.
func (cp *ControlPlane) Stop() error {
	if !cp.standalone {
		return nil
	}
	return Cleanup(cp.opts.Base, "", cp.opts.Logf)
}

// SaveLogs copies the logs of every process started so far into dir.
func (cp *ControlPlane) SaveLogs(dir string) error {
	return saveLogs(cp.d, dir)
}

// StartProcess starts a process recorded like the control plane's own: its
// output goes to LogPath(name), Stop (or a later run's cleanup) ends it.
func (cp *ControlPlane) StartProcess(name string, args ...string) error {
	return cp.ps.start(name, args...)
}

// StopProcess sends SIGTERM and, after grace, SIGKILL; zero grace SIGKILLs
// at once (a crash: no lease released, nothing flushed).
func (cp *ControlPlane) StopProcess(name string, grace time.Duration) error {
	return cp.ps.stop(name, grace)
}

// ProcessExited returns an error naming the log when the process has exited.
func (cp *ControlPlane) ProcessExited(name string) error { return cp.ps.exited(name) }

// LogPath is where a process's output goes.
func (cp *ControlPlane) LogPath(name string) string { return cp.ps.logPath(name) }

// UserConfig returns a client config that authenticates as user in groups
// with a client certificate signed by the cluster CA (e.g.
// "system:node:<name>" in "system:nodes").
func (cp *ControlPlane) UserConfig(user string, groups []string) (*rest.Config, error) {
	ca, err := loadCA(cp.d.pki)
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := ca.clientCert(user, groups)
	if err != nil {
		return nil, err
	}
	return &rest.Config{
		Host:            cp.Host,
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile, CertData: certPEM, KeyData: keyPEM},
		QPS:             50, Burst: 100,
	}, nil
}

// ServiceAccountKubeconfig writes a kubeconfig at path that authenticates as
// service account ns/sa with a token from the TokenRequest API, in the file
// path+".token" (the kubeconfig names it as tokenFile, so rewriting the file
// rotates the token). The service account is created when missing. With
// boundNode set the token is bound to that Node object, so the API server
// records authentication.kubernetes.io/node-name (as for a pod-bound token of
// a pod on that node) and stops accepting it once the Node is deleted.
func (cp *ControlPlane) ServiceAccountKubeconfig(ctx context.Context, ns, sa, boundNode, path string) error {
	if err := cp.EnsureServiceAccount(ctx, ns, sa); err != nil {
		return err
	}
	token, err := cp.ServiceAccountToken(ctx, ns, sa, boundNode)
	if err != nil {
		return err
	}
	return cp.writeTokenKubeconfig(path, ns, sa, token)
}

// PodServiceAccountKubeconfig is ServiceAccountKubeconfig with the token of
// the pod's service account bound to the pod, as the kubelet projects it:
// the API server records the pod's node (node-name) and accepts the token
// while the pod exists, also after its Node is gone (no kubelet or pod
// garbage collector runs here to delete the pod).
func (cp *ControlPlane) PodServiceAccountKubeconfig(ctx context.Context, pod *corev1.Pod, path string) error {
	token, err := cp.token(ctx, pod.Namespace, pod.Spec.ServiceAccountName,
		&authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
	if err != nil {
		return err
	}
	return cp.writeTokenKubeconfig(path, pod.Namespace, pod.Spec.ServiceAccountName, token)
}

func (cp *ControlPlane) writeTokenKubeconfig(path, ns, sa, token string) error {
	tokenFile := path + ".token"
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		return err
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: %q, user: {tokenFile: %q}}]
contexts: [{name: e2e, context: {cluster: e2e, user: %q, namespace: %q}}]
current-context: e2e
`, cp.Host, cp.CAFile, ns+":"+sa, tokenFile, ns+":"+sa, ns)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// ServiceAccountToken returns a 4h token of service account ns/sa from the
// TokenRequest API, bound to Node boundNode unless that is empty.
func (cp *ControlPlane) ServiceAccountToken(ctx context.Context, ns, sa, boundNode string) (string, error) {
	var ref *authv1.BoundObjectReference
	if boundNode != "" {
		node, err := cp.Client.CoreV1().Nodes().Get(ctx, boundNode, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("node %s to bind the token to: %w", boundNode, err)
		}
		ref = &authv1.BoundObjectReference{Kind: "Node", APIVersion: "v1", Name: node.Name, UID: node.UID}
	}
	return cp.token(ctx, ns, sa, ref)
}

func (cp *ControlPlane) token(ctx context.Context, ns, sa string, ref *authv1.BoundObjectReference) (string, error) {
	exp := int64(4 * 3600)
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &exp, BoundObjectRef: ref}}
	tr, err := cp.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for %s/%s: %w", ns, sa, err)
	}
	return tr.Status.Token, nil
}

// EnsureServiceAccount creates namespace ns and service account sa in it
// unless they exist.
func (cp *ControlPlane) EnsureServiceAccount(ctx context.Context, ns, sa string) error {
	_, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	_, err = cp.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("service account %s/%s: %w", ns, sa, err)
	}
	return nil
}

// CreateNode creates a Node object (no kubelet behind it), Ready, so that
// node-bound tokens and node checks have something to refer to.
func (cp *ControlPlane) CreateNode(ctx context.Context, name string) (*corev1.Node, error) {
	n, err := cp.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create node %s: %w", name, err)
	}
	return n, nil
}

// loadCA reads the cluster CA that writePKI wrote into dir.
func loadCA(dir string) (*certAuthority, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("cluster CA key is not ECDSA")
	}
	return &certAuthority{cert: cert, key: key}, nil
}

// clientCert issues a client certificate (CN user, O groups) in PEM.
func (ca *certAuthority) clientCert(user string, groups []string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: user, Organization: groups},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}
