// Package e2e runs csi-agent on a real kubelet: a hermetic single node on
// loopback (tests/e2e/run.sh, `make e2e`), or a kind cluster
// (tests/kind-e2e.sh, `make kind-e2e`), with the same cases.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/testutil"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

var (
	cleanupOnly = flag.Bool("e2e.cleanup", false, "only tear down what an earlier run left under the base directory, then exit")
	baseDir     = flag.String("e2e.base", framework.EnvOr("CSI_AGENT_E2E_BASE", "/var/lib/csi-agent-e2e"), "directory of the hermetic node (removed afterwards)")
	toolsDir    = flag.String("e2e.tools", framework.EnvOr("CSI_AGENT_E2E_TOOLS", "tools"), "module (relative to tests/e2e) pinning the k8s.io/kubernetes to build kubelet and kube-apiserver from: tools (current) or tools-oldest")
	artifacts   = flag.String("e2e.artifacts", framework.EnvOr("CSI_AGENT_E2E_ARTIFACTS", filepath.Join(os.TempDir(), "csi-agent-e2e-artifacts")), "where logs go when the run fails")
)

// Kind mode: CSI_AGENT_E2E_KIND_NODE names the kind node container and
// KUBECONFIG points at the cluster, which kind-e2e.sh prepared.
const kindNodeEnv = "CSI_AGENT_E2E_KIND_NODE"

// suite is the cluster the cases run against, set up once in TestMain.
var suite struct {
	client      kubernetes.Interface
	node        framework.Node
	trustDomain string
	setupErr    error
	local       *framework.Local
	teardown    sync.Once
}

// Namespaces whose pods get the default ns/sa identity. The rules case uses
// its own namespace, where only its label and container rules apply.
var defaultIDNamespaces = []string{
	"e2e-basic", "e2e-readonly", "e2e-hostpath", "e2e-writable", "e2e-unpublish",
	"e2e-restart", "e2e-poststart", "e2e-ns-a", "e2e-ns-b", "e2e-latency",
	"demo", // deploy/kind/example
}

const rulesNamespace = "e2e-rules"

// agentOverrides are what the e2e changes in the deploy config: a short
// X.509-SVID lifetime so rotation is seen within a test, and rules.
func agentOverrides() map[string]any {
	var nsRules []any
	for _, ns := range defaultIDNamespaces {
		nsRules = append(nsRules, map[string]any{"selectors": []any{"k8s:ns:" + ns}})
	}
	o := map[string]any{
		"ca": map[string]any{"x509SVIDTTL": "30s"},
		"svids": []any{
			map[string]any{"spiffeID": "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}", "rules": nsRules},
			map[string]any{"spiffeID": "/e2e/pod-label/web", "rules": []any{
				map[string]any{"selectors": []any{"k8s:ns:" + rulesNamespace, "k8s:pod-label:app:web"}},
			}},
			map[string]any{"spiffeID": "/e2e/container-name/worker", "rules": []any{
				map[string]any{"selectors": []any{"k8s:ns:" + rulesNamespace, "k8s:container-name:worker"}},
			}},
		},
	}
	// The API lets a pod certificate refresh no sooner than 10 minutes after
	// issue, and the kubelet adds jitter: a rotation costs ~13 minutes, so
	// only `make e2e-podcert-rotation` asks for one.
	if f := os.Getenv(podCertRefreshEnv); f != "" {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s=%q: %v\n", podCertRefreshEnv, f, err)
			os.Exit(2)
		}
		o["controller"] = map[string]any{"podCertificates": map[string]any{"refreshFraction": v}}
	}
	return o
}

// podCertRefreshEnv sets controller.podCertificates.refreshFraction.
const podCertRefreshEnv = "CSI_AGENT_E2E_PODCERT_REFRESH"

func TestMain(m *testing.M) {
	flag.Parse()
	logf := framework.Logger("e2e")
	if *cleanupOnly {
		if err := framework.Cleanup(*baseDir, *artifacts, logf); err != nil {
			logf("cleanup: %v", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	kindNode := os.Getenv(kindNodeEnv)
	if kindNode == "" && os.Geteuid() != 0 {
		// Every case calls testutil.RequireRoot: skipped, or failed under CI.
		os.Exit(m.Run())
	}
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	if kindNode != "" {
		suite.setupErr = setupKind(ctx, kindNode, logf)
	} else {
		suite.setupErr = setupLocal(ctx, logf)
		framework.OnInterrupt(logf, func() { teardown(true, logf) })
	}
	cancel()
	if suite.setupErr != nil {
		logf("setup failed after %.1fs: %v", time.Since(t0).Seconds(), suite.setupErr)
	} else {
		logf("cluster ready in %.1fs", time.Since(t0).Seconds())
	}
	code := m.Run()
	teardown(code != 0 || suite.setupErr != nil, logf)
	logf("total %.1fs", time.Since(t0).Seconds())
	os.Exit(code)
}

func teardown(failed bool, logf func(string, ...any)) {
	suite.teardown.Do(func() {
		if suite.local == nil {
			return
		}
		t0 := time.Now()
		if err := suite.local.Stop(failed); err != nil {
			logf("teardown: %v", err)
		}
		logf("teardown %.1fs", time.Since(t0).Seconds())
	})
}

func setupLocal(ctx context.Context, logf func(string, ...any)) error {
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	component, err := caComponent(filepath.Join(wd, *toolsDir), filepath.Join(wd, "..", "..", "deploy", "kind"))
	if err != nil {
		return err
	}
	n, err := framework.Start(ctx, framework.Options{
		Base:           *baseDir,
		RepoRoot:       filepath.Join(wd, "..", ".."),
		E2EDir:         wd,
		ToolsDir:       filepath.Join(wd, *toolsDir),
		CacheDir:       framework.CacheDir(),
		Artifacts:      *artifacts,
		AgentOverrides: agentOverrides(),
		Component:      component,
		Logf:           logf,
	})
	suite.local = n
	if err != nil {
		return err
	}
	logf("node: Kubernetes %s (kubelet %s, containerd %s, kernel %s)", n.Version, n.NodeInfo.KubeletVersion,
		n.NodeInfo.ContainerRuntimeVersion, n.NodeInfo.KernelVersion)
	if n.Cluster {
		logf("node: agent in cluster mode, the controller as a second static pod")
	} else {
		logf("node: agent without a controller (components/%s)", component)
	}
	suite.client, suite.node = n.Client, n
	suite.trustDomain, _ = n.AgentConfig["trustDomain"].(string)
	return nil
}

// caComponent picks the deploy component of the agent's CA mode: none
// (deploy/kind's cluster mode) where the API server serves
// certificates.k8s.io/v1 ClusterTrustBundles (v1.37 on), else self-managed.
func caComponent(tools, deployDir string) (string, error) {
	version, err := framework.KubernetesVersion(tools)
	if err != nil {
		return "", err
	}
	var major, minor int
	if _, err := fmt.Sscanf(version, "v%d.%d", &major, &minor); err != nil {
		return "", fmt.Errorf("kubernetes version %q: %w", version, err)
	}
	if _, err := os.Stat(filepath.Join(deployDir, "components", "self-managed")); err != nil || major > 1 || minor >= 37 {
		return "", nil
	}
	return "self-managed", nil
}

// setupKind points the suite at a kind cluster where kind-e2e.sh applied
// deploy/kind: it rewrites the agent ConfigMap with the e2e overrides and
// restarts the agent pods so they take it.
func setupKind(ctx context.Context, node string, logf func(string, ...any)) error {
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(clientcmd.NewDefaultClientConfigLoadingRules(), nil).ClientConfig()
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	suite.client, suite.node = cs, &framework.Kind{Container: node}
	cms := cs.CoreV1().ConfigMaps(framework.AgentNamespace)
	cm, err := cms.Get(ctx, framework.AgentConfigMap, metav1.GetOptions{})
	if err != nil {
		return err
	}
	conf := map[string]any{}
	if err := yaml.Unmarshal([]byte(cm.Data["config.yaml"]), &conf); err != nil {
		return err
	}
	framework.MergeConfig(conf, agentOverrides())
	raw, err := yaml.Marshal(conf)
	if err != nil {
		return err
	}
	cm.Data["config.yaml"] = string(raw)
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return err
	}
	suite.trustDomain, _ = conf["trustDomain"].(string)
	pods := cs.CoreV1().Pods(framework.AgentNamespace)
	if err := pods.DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=csi-agent"}); err != nil {
		return err
	}
	logf("kind: agent config updated, waiting for the agent pods")
	time.Sleep(2 * time.Second)
	return wait.PollUntilContextTimeout(ctx, time.Second, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		l, err := pods.List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=csi-agent"})
		if err != nil || len(l.Items) == 0 {
			return false, nil
		}
		for i := range l.Items {
			if l.Items[i].DeletionTimestamp != nil || !framework.PodReady(&l.Items[i]) {
				return false, nil
			}
		}
		return true, nil
	})
}

// needCluster is the first line of every case.
func needCluster(t *testing.T) {
	t.Helper()
	if os.Getenv(kindNodeEnv) == "" {
		testutil.RequireRoot(t)
	}
	if suite.setupErr != nil {
		t.Fatalf("cluster setup failed: %v", suite.setupErr)
	}
}

// agentPod returns the agent's pod on the node (the mirror pod of the
// static pod here; the DaemonSet's pod on kind).
func agentPod(ctx context.Context, t *testing.T) *corev1.Pod {
	t.Helper()
	l, err := suite.client.CoreV1().Pods(framework.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=csi-agent"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range l.Items {
		p := &l.Items[i]
		if p.DeletionTimestamp == nil && (p.Spec.NodeName == framework.NodeName || os.Getenv(kindNodeEnv) != "") {
			return p
		}
	}
	t.Fatalf("no agent pod found")
	return nil
}
