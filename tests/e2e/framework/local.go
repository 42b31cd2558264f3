package framework

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// Names shared by the deploy manifests, the node and the tests.
const (
	NodeName       = "localhost"
	DriverName     = "csi-agent.spiffe.io"
	AgentNamespace = "csi-agent"
	AgentDaemonSet = "csi-agent"
	AgentConfigMap = "csi-agent-config"
	AgentSA        = "csi-agent"
	AgentImage     = "csi-agent:dev"
	WorkloadImage  = "csi-agent-workload:dev"
	PauseImage     = "docker.io/csi-agent-e2e/pause:e2e"
	// The controller of cluster mode (deploy/kind/controller.yaml).
	ControllerDeployment = "csi-agent-controller"
	ControllerSA         = "csi-agent-controller"

	// The controller's static pod shares the node's network with the agent
	// (whose metrics are on 9890).
	controllerMetricsPort = 9891

	apiServerPort = 6443
	etcdPort      = 12379 // peer +1, metrics +2
)

// Ports the node listens on (all on 127.0.0.1); a busy one fails preflight.
var nodePorts = []int{apiServerPort, etcdPort, etcdPort + 1, etcdPort + 2, 10248, 10250, 10255}

// Options configure a hermetic local node.
type Options struct {
	Base      string // every file of the node lives here; removed at the end
	RepoRoot  string
	E2EDir    string // the tests/e2e module
	ToolsDir  string // module pinning k8s.io/kubernetes; default E2EDir/tools
	CacheDir  string // built Kubernetes binaries, by version
	Artifacts string // logs are copied here when the run failed
	// AgentOverrides replace top-level keys of the deploy config.yaml (a map
	// value is merged one level deep).
	AgentOverrides map[string]any
	// Component is a deploy/kind component to run with (e.g. self-managed,
	// where the API server lacks what cluster mode needs); empty: deploy/kind.
	Component string
	Logf      func(string, ...any)
}

// Local is a single-node cluster of host processes on loopback: etcd,
// kube-apiserver, containerd and kubelet, with the agent as a static pod
// made from the deploy DaemonSet.
type Local struct {
	opts Options
	d    dirs
	st   *state
	ps   *procSet
	cp   *ControlPlane

	Rest    *rest.Config
	Client  kubernetes.Interface
	Version string // Kubernetes version of kubelet and kube-apiserver
	// Cluster is set when the deploy manifests run the controller (cluster
	// mode): it runs as a second static pod.
	Cluster     bool
	NodeInfo    corev1.NodeSystemInfo // as the kubelet reported it
	AgentConfig map[string]any        // as the agent runs it, paths rewritten
	paths       *strings.Replacer
	kubeletArgs []string
	kubelet     string
	objs        []*unstructured.Unstructured // the deploy manifests the node runs
}

type dirs struct {
	base, pki, etcd, logs, bin, images                    string
	ctrdRoot, ctrdState, ctrdConfig, ctrdSock, runcRoot   string
	cni, kubeletRoot, kubeletConf, manifests, podLogs     string
	volumePlugins, agentState, agentRun, agentConf, token string
	ctrlConf, ctrlToken, admin                            string
}

func newDirs(base string) dirs {
	j := func(p ...string) string { return filepath.Join(append([]string{base}, p...)...) }
	return dirs{
		base: base, pki: j("pki"), etcd: j("etcd"), logs: j("logs"), bin: j("images", "bin"), images: j("images", "images.tar"),
		ctrdRoot: j("containerd", "root"), ctrdState: j("containerd", "state"), ctrdConfig: j("containerd", "config.toml"),
		ctrdSock: j("containerd", "containerd.sock"), runcRoot: j("containerd", "runc"),
		cni: j("cni"), kubeletRoot: j("kubelet"), kubeletConf: j("kubelet-config"), manifests: j("manifests"),
		podLogs: j("pod-logs"), volumePlugins: j("volume-plugins"),
		agentState: j("agent-state"), agentRun: j("agent-run"), agentConf: j("agent-config"), token: j("agent-token"),
		ctrlConf: j("controller-config"), ctrlToken: j("controller-token"), admin: j("admin.kubeconfig"),
	}
}

// Start brings the node up. On error the caller must still call Stop.
func Start(ctx context.Context, opts Options) (*Local, error) {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.Component == "" {
		opts.Component = os.Getenv(ComponentEnv)
	}
	n := &Local{opts: opts, d: newDirs(opts.Base)}
	n.paths = strings.NewReplacer(
		"/var/lib/kubelet", n.d.kubeletRoot,
		"/var/lib/csi-agent", n.d.agentState,
		"/run/csi-agent", n.d.agentRun,
	)
	if err := Cleanup(opts.Base, "", opts.Logf); err != nil {
		return n, fmt.Errorf("cleaning up an earlier run: %w", err)
	}
	if err := preflight(); err != nil {
		return n, err
	}
	for _, d := range []string{n.d.pki, n.d.etcd, n.d.logs, n.d.bin, n.d.ctrdRoot, n.d.ctrdState, n.d.runcRoot, n.d.cni,
		n.d.kubeletRoot, n.d.kubeletConf, n.d.manifests, n.d.podLogs, n.d.volumePlugins, n.d.agentState,
		filepath.Join(n.d.agentRun, "sockets"), n.d.agentConf, n.d.token, n.d.ctrlConf, n.d.ctrlToken} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return n, err
		}
	}
	st, err := newState()
	if err != nil {
		return n, err
	}
	n.st = st
	n.ps = &procSet{base: opts.Base, logs: n.d.logs, st: st, running: map[string]*proc{}}
	if err := n.st.save(opts.Base); err != nil {
		return n, err
	}

	step := func(name string, f func(context.Context) error) error {
		t0 := time.Now()
		if err := f(ctx); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		opts.Logf("node: %s (%.1fs)", name, time.Since(t0).Seconds())
		return nil
	}
	for _, s := range []struct {
		name string
		f    func(context.Context) error
	}{
		{"build kubelet and kube-apiserver", n.buildKubernetes},
		{"build images", func(ctx context.Context) error { return BuildImages(ctx, opts.RepoRoot, opts.E2EDir, n.d.images) }},
		{"certificates", func(context.Context) error { return writePKI(n.d.pki) }},
		{"etcd and kube-apiserver", n.startControlPlane},
		{"deploy manifests", n.applyManifests},
		{"containerd", n.startContainerd},
		{"kubelet", n.startKubelet},
		{"static pods", n.writeStaticPods},
		{"agent ready and registered", n.waitAgent},
	} {
		if err := step(s.name, s.f); err != nil {
			return n, err
		}
	}
	return n, nil
}

func preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("the local node needs root")
	}
	for _, p := range []string{"/var/lib/kubelet/device-plugins/kubelet.sock"} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists: another kubelet runs on this machine", p)
		}
	}
	for _, m := range cgroupMounts() {
		if _, err := os.Stat(filepath.Join(m, "kubepods")); err == nil {
			return fmt.Errorf("%s/kubepods exists: another kubelet runs on this machine", m)
		}
	}
	if err := portsFree(nodePorts); err != nil {
		return err
	}
	for _, bin := range []string{"etcd", "containerd", "containerd-shim-runc-v2", "runc", "ctr"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not installed (tests/e2e/run.sh installs it): %w", bin, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/loopback"); err != nil {
		return fmt.Errorf("CNI loopback plugin missing (containernetworking-plugins): %w", err)
	}
	return nil
}

func (n *Local) buildKubernetes(ctx context.Context) error {
	tools := n.opts.ToolsDir
	if tools == "" {
		tools = filepath.Join(n.opts.E2EDir, "tools")
	}
	version, err := KubernetesVersion(tools)
	if err != nil {
		return err
	}
	n.Version = version
	kubelet, apiserver, err := BuildKubernetes(ctx, tools, n.opts.CacheDir, n.opts.Logf)
	n.kubelet = kubelet
	n.st.APIServer = apiserver
	return err
}

func (n *Local) start(name string, args ...string) error     { return n.ps.start(name, args...) }
func (n *Local) stop(name string, grace time.Duration) error { return n.ps.stop(name, grace) }
func (n *Local) exited(name string) error                    { return n.ps.exited(name) }

// startControlPlane runs the same etcd and kube-apiserver as
// StartControlPlane, recorded in the node's state.
func (n *Local) startControlPlane(ctx context.Context) error {
	n.cp = &ControlPlane{opts: ControlPlaneOptions{Base: n.opts.Base, APIServerPort: apiServerPort, EtcdPort: etcdPort, Logf: n.opts.Logf},
		d: n.d, ps: n.ps, Version: n.Version}
	if err := n.cp.start(ctx); err != nil {
		return err
	}
	n.Rest, n.Client = n.cp.Rest, n.cp.Client
	return nil
}

func writeKubeconfig(path, server, ca, cert, key string) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: e2e, user: {client-certificate: %q, client-key: %q}}]
contexts: [{name: e2e, context: {cluster: e2e, user: e2e}}]
current-context: e2e
`, server, ca, cert, key)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// applyManifests server-side dry-runs every deploy manifest (a schema error
// fails here), applies for real what the node needs (namespace, RBAC,
// CSIDriver, ConfigMap), and writes the agent's (and the controller's)
// config; writeStaticPods makes their pods once the Node exists.
func (n *Local) applyManifests(ctx context.Context) error {
	deployDir := filepath.Join(n.opts.RepoRoot, "deploy", "kind")
	example, err := Kustomize(filepath.Join(deployDir, "example"))
	if err != nil {
		return err
	}
	// The podCertificate example too, where the API server has
	// PodCertificateRequests: its Deployment is dry-run (strict field
	// validation against this API server), the rest applied.
	if n.servesPodCertificates() {
		podCert, err := Kustomize(filepath.Join(deployDir, "example", "pod-certificate"))
		if err != nil {
			return err
		}
		example = append(example, podCert...)
	}
	tmp, err := os.MkdirTemp(n.d.base, "kustomize-")
	if err != nil {
		return err
	}
	// Every component is dry-run on top of deploy/kind; upstream-ca with a
	// CA made here.
	withComponent := map[string][]*unstructured.Unstructured{}
	entries, err := os.ReadDir(filepath.Join(deployDir, "components"))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		overlay, err := ComponentOverlay(deployDir, tmp, e.Name())
		if e.Name() == "upstream-ca" {
			overlay, err = UpstreamCAOverlay(deployDir, tmp)
		}
		if err != nil {
			return err
		}
		if withComponent[e.Name()], err = Kustomize(overlay); err != nil {
			return err
		}
	}
	objs, err := Kustomize(deployDir)
	if err != nil {
		return err
	}
	if c := n.opts.Component; c != "" {
		if objs = withComponent[c]; objs == nil {
			return fmt.Errorf("no component %s in %s/components", c, deployDir)
		}
	}
	n.objs = objs
	_, err = Find(objs, "Deployment", ControllerDeployment)
	n.Cluster = err == nil
	a, err := NewApplier(n.Rest)
	if err != nil {
		return err
	}
	all := append(append([]*unstructured.Unstructured{}, objs...), example...)
	for _, o := range all {
		if !runsPods(o) {
			if err := a.Apply(ctx, o, false); err != nil {
				return err
			}
		}
	}
	dry := append([]*unstructured.Unstructured{}, all...)
	counts := []string{}
	for _, c := range sortedKeys(withComponent) {
		dry = append(dry, withComponent[c]...)
		counts = append(counts, fmt.Sprintf("%d with %s", len(withComponent[c]), c))
	}
	for _, o := range dry {
		if err := a.Apply(ctx, o, true); err != nil {
			return err
		}
	}
	n.opts.Logf("node: %d deploy objects passed server-side dry-run (%s)", len(all), strings.Join(counts, ", "))

	cfg, err := AgentConfig(objs, n.opts.AgentOverrides)
	if err != nil {
		return err
	}
	raw, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	rewritten := n.paths.Replace(string(raw))
	if err := yaml.Unmarshal([]byte(rewritten), &n.AgentConfig); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(n.d.agentConf, "config.yaml"), []byte(rewritten), 0o644); err != nil {
		return err
	}
	if !n.Cluster {
		return nil
	}
	// The controller reads the same file; only its metrics move off the
	// agent's port, as both use the node's network here.
	ctrl := map[string]any{}
	if err := yaml.Unmarshal([]byte(rewritten), &ctrl); err != nil {
		return err
	}
	MergeConfig(ctrl, map[string]any{"metrics": map[string]any{"addr": fmt.Sprintf("127.0.0.1:%d", controllerMetricsPort)}})
	raw, err = yaml.Marshal(ctrl)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.d.ctrlConf, "config.yaml"), raw, 0o644)
}

// writeStaticPods writes the agent's (and in cluster mode the controller's)
// static pod once the kubelet has registered the Node. A static pod has no
// projected token: a TokenRequest token stands in, for the agent bound to
// the Node so that, like a pod-bound one, it names the node to the API
// server (cluster mode's CSRs); the kubelet authenticates it with a
// TokenReview and authorizes the agent's GET /pods by the deploy RBAC. The
// API server is reached on the node's loopback, as there is no Service
// network.
func (n *Local) writeStaticPods(ctx context.Context) error {
	env := []corev1.EnvVar{{Name: "KUBERNETES_SERVICE_HOST", Value: "127.0.0.1"}, {Name: "KUBERNETES_SERVICE_PORT", Value: fmt.Sprint(apiServerPort)}}
	if err := n.writeToken(ctx, n.d.token, AgentSA, NodeName, 0o600); err != nil {
		return err
	}
	if n.Cluster {
		// The controller runs as its image's non-root user.
		if err := n.writeToken(ctx, n.d.ctrlToken, ControllerSA, "", 0o644); err != nil {
			return err
		}
		pod, err := StaticControllerPod(n.objs, n.d.ctrlConf, n.d.ctrlToken, env, controllerMetricsPort)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(n.d.manifests, ControllerDeployment+".yaml"), pod, 0o644); err != nil {
			return err
		}
	}
	pod, err := StaticAgentPod(n.objs, n.d.agentConf, n.d.token, n.paths, env)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.d.manifests, "csi-agent.yaml"), pod, 0o644)
}

// writeToken writes what a service account's token volume holds into dir.
func (n *Local) writeToken(ctx context.Context, dir, sa, boundNode string, mode os.FileMode) error {
	token, err := n.cp.ServiceAccountToken(ctx, AgentNamespace, sa, boundNode)
	if err != nil {
		return err
	}
	ca, err := os.ReadFile(filepath.Join(n.d.pki, "ca.crt"))
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{"token": []byte(token), "ca.crt": ca, "namespace": []byte(AgentNamespace)} {
		if err := os.WriteFile(filepath.Join(dir, name), data, mode); err != nil {
			return err
		}
	}
	return nil
}

func (n *Local) startContainerd(ctx context.Context) error {
	cniConf := `{"cniVersion":"0.4.0","name":"lo","plugins":[{"type":"loopback"}]}`
	if err := os.WriteFile(filepath.Join(n.d.cni, "10-loopback.conflist"), []byte(cniConf), 0o644); err != nil {
		return err
	}
	if err := n.writePodNetwork(); err != nil {
		return err
	}
	conf := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = %q
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  disable_apparmor = true
  # These VMs lack CAP_SYS_RESOURCE: without this every sandbox fails in runc.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
`, n.d.ctrdRoot, n.d.ctrdState, n.d.ctrdSock, filepath.Join(n.d.ctrdRoot, "opt"), PauseImage, n.d.runcRoot, n.d.cni)
	if err := os.WriteFile(n.d.ctrdConfig, []byte(conf), 0o644); err != nil {
		return err
	}
	// Shim sockets go to /run/containerd/s, pod network namespaces (none
	// here: every pod uses the host network) to /run/netns.
	for _, p := range []string{"/run/containerd", "/run/netns"} {
		if err := n.st.remember(p); err != nil {
			return err
		}
	}
	if err := n.st.save(n.opts.Base); err != nil {
		return err
	}
	if err := n.start("containerd", "containerd", "--config="+n.d.ctrdConfig); err != nil {
		return err
	}
	if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		if err := n.exited("containerd"); err != nil {
			return false, err
		}
		return n.ctr(ctx, "version") == nil, nil
	}); err != nil {
		return err
	}
	return n.ctr(ctx, "images", "import", n.d.images)
}

// ctr runs containerd's CLI against the node's containerd, in the CRI namespace.
func (n *Local) ctr(ctx context.Context, args ...string) error {
	_, err := ctrOut(ctx, n.d.ctrdSock, args...)
	return err
}

func ctrOut(ctx context.Context, sock string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", sock, "--namespace", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (n *Local) startKubelet(ctx context.Context) error {
	pki := func(f string) string { return filepath.Join(n.d.pki, f) }
	// The serving certificate sits where a kind or kubeadm kubelet keeps its
	// self-signed one, laid out the same way (certificate, then its CA), so
	// the deploy config's caFile verifies this kubelet as it does those. It
	// is signed by the cluster CA so the API server verifies it too.
	servingCrt, servingKey, err := writeKubeletServing(n.d.pki, filepath.Join(n.d.kubeletRoot, "pki"))
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 10255
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true, cacheTTL: 10s}
  x509: {clientCAFile: %q}
authorization:
  mode: Webhook
  webhook: {cacheAuthorizedTTL: 10s, cacheUnauthorizedTTL: 5s}
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://%s
staticPodPath: %q
fileCheckFrequency: 5s
syncFrequency: 10s
podLogsDir: %q
volumePluginDir: %q
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
resolvConf: ""
maxPods: 110
`, servingCrt, servingKey, pki("ca.crt"), n.d.ctrdSock, n.d.manifests, n.d.podLogs, n.d.volumePlugins)
	confPath := filepath.Join(n.d.kubeletConf, "config.yaml")
	if err := os.WriteFile(confPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	kc := filepath.Join(n.d.kubeletConf, "kubeconfig")
	if err := writeKubeconfig(kc, n.Rest.Host, pki("ca.crt"), pki("kubelet-client.crt"), pki("kubelet-client.key")); err != nil {
		return err
	}
	for _, p := range []string{"/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/containers"} {
		if err := n.st.remember(p); err != nil {
			return err
		}
	}
	n.kubeletArgs = []string{n.kubelet, "--config=" + confPath, "--kubeconfig=" + kc, "--hostname-override=" + NodeName,
		"--root-dir=" + n.d.kubeletRoot, "--cert-dir=" + filepath.Join(n.d.pki, "kubelet-generated"), "--v=2"}
	if err := n.start("kubelet", n.kubeletArgs...); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		if err := n.exited("kubelet"); err != nil {
			return false, err
		}
		node, err := n.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		// A stale cache or a wrong stamp would test another version than named.
		if v := node.Status.NodeInfo.KubeletVersion; v != n.Version {
			return false, fmt.Errorf("node %s reports kubelet %s, built %s", NodeName, v, n.Version)
		}
		n.NodeInfo = node.Status.NodeInfo
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
}

// waitAgent waits for the agent's mirror pod to be Ready and for the kubelet
// to have registered the CSI driver (the CSINode object lists it).
func (n *Local) waitAgent(ctx context.Context) error {
	mirrors := []string{AgentDaemonSet + "-" + NodeName}
	if n.Cluster {
		mirrors = append(mirrors, ControllerDeployment+"-"+NodeName)
	}
	var last string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		if err := n.exited("kubelet"); err != nil {
			return false, err
		}
		for _, mirror := range mirrors {
			pod, err := n.Client.CoreV1().Pods(AgentNamespace).Get(ctx, mirror, metav1.GetOptions{})
			if err != nil {
				last = err.Error()
				return false, nil
			}
			if !PodReady(pod) {
				last = "pod not ready: " + PodSummary(pod)
				return false, nil
			}
		}
		csiNode, err := n.Client.StorageV1().CSINodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		for _, d := range csiNode.Spec.Drivers {
			if d.Name == n.Driver() {
				return true, nil
			}
		}
		last = "CSINode does not list " + n.Driver() + " yet"
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("%w (%s)", err, last)
	}
	return nil
}

// PodReady reports the Ready condition.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// PodSummary is a one-line account of a pod's state for error messages.
func PodSummary(p *corev1.Pod) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s/%s phase=%s", p.Namespace, p.Name, p.Status.Phase)
	for _, cs := range append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		fmt.Fprintf(&b, " [%s ready=%v restarts=%d", cs.Name, cs.Ready, cs.RestartCount)
		switch {
		case cs.State.Waiting != nil:
			fmt.Fprintf(&b, " waiting %s: %s", cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			fmt.Fprintf(&b, " terminated %s exit=%d", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		case cs.State.Running != nil:
			b.WriteString(" running")
		}
		b.WriteString("]")
	}
	return b.String()
}

// Stop deletes the pods through the API (so the agent unpublishes their
// volumes), then tears the node down and restores the machine. keepLogs
// copies the component logs to the artifacts directory first.
func (n *Local) Stop(keepLogs bool) error {
	if n.Client != nil && n.ps != nil && n.ps.running["kubelet"] != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		n.deleteWorkloadPods(ctx)
		// Then the agent and the controller, by taking their static manifests away.
		_ = os.Remove(filepath.Join(n.d.manifests, "csi-agent.yaml"))
		_ = os.Remove(filepath.Join(n.d.manifests, ControllerDeployment+".yaml"))
		_ = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			out, err := ctrOut(ctx, n.d.ctrdSock, "tasks", "ls", "-q")
			return err == nil && strings.TrimSpace(out) == "", nil
		})
		cancel()
	}
	artifacts := ""
	if keepLogs {
		artifacts = n.opts.Artifacts
	}
	return Cleanup(n.opts.Base, artifacts, n.opts.Logf)
}

func (n *Local) deleteWorkloadPods(ctx context.Context) {
	zero := int64(0)
	pods, err := n.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		if p.Namespace == AgentNamespace {
			continue
		}
		_ = n.Client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	_ = wait.PollUntilContextCancel(ctx, 250*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		pods, err := n.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.Namespace != AgentNamespace {
				return false, nil
			}
		}
		return true, nil
	})
}

// kubeletHealthy reports the kubelet's healthz on loopback.
func kubeletHealthy(ctx context.Context) bool {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10248/healthz", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
