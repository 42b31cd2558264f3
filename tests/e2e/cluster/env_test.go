package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

// What the suite runs: names, and the lifetimes that make renewal and
// rotation happen within a test.
const (
	namespace    = "csi-agent"
	agentSA      = "csi-agent"
	controllerSA = "csi-agent-controller"
	trustDomain  = "cluster-test.example"
	// The agent asks for more than the controller's cap, which cuts it:
	// 10 minutes, the least both accept (the CSR API's minimum). Renewal at
	// half of that is beyond a test's patience: cases that need a fresh
	// intermediate start an agent or submit a CSR instead.
	requestedIntermediateTTL = "20m"
	intermediateTTL          = 10 * time.Minute
	x509SVIDTTL              = "12s"
	rootActivationDelay      = 5 * time.Second
)

var td = spiffeid.RequireTrustDomainFromString(trustDomain)

// Nodes with an agent from the start; a case adds its own node to delete.
var nodes = []string{"node-a", "node-b"}

// env is the running cluster: the binary, the controller replicas and the agents.
type env struct {
	cp          *framework.ControlPlane
	dir         string // under the control plane's base
	bin         string
	repo        string
	controllers []*controller
	agents      map[string]*agent
	logf        func(string, ...any)
}

type controller struct {
	identity, config, kubeconfig string
	metrics                      string // host:port of /readyz
}

type agent struct {
	node, config, kubeconfig, socket string
	metrics                          string
}

func (c *controller) proc() string { return "controller-" + c.identity }
func (a *agent) proc() string      { return "agent-" + a.node }

// Addr is the go-spiffe address of the agent's Workload API.
func (a *agent) Addr() string { return "unix://" + a.socket }

func newEnv(ctx context.Context, cp *framework.ControlPlane, repo, dir string, logf func(string, ...any)) (*env, error) {
	e := &env{cp: cp, dir: dir, repo: repo, agents: map[string]*agent{}, logf: logf}
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		return e, err
	}
	e.bin = filepath.Join(dir, "bin", "csi-agent")
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", e.bin, "./cmd/csi-agent")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return e, fmt.Errorf("the agent does not build: %w\n%s", err, out)
	}
	logf("built csi-agent (%.1fs)", time.Since(t0).Seconds())
	if out, err := exec.CommandContext(ctx, e.bin, "controller", "-h").CombinedOutput(); err != nil && !strings.Contains(string(out), "-config") {
		return e, fmt.Errorf("csi-agent has no controller command yet: %w: %s", err, out)
	}
	if err := e.applyRBAC(ctx); err != nil {
		return e, fmt.Errorf("RBAC: %w", err)
	}
	ctrlKC := filepath.Join(dir, "controller.kubeconfig")
	if err := cp.ServiceAccountKubeconfig(ctx, namespace, controllerSA, "", ctrlKC); err != nil {
		return e, err
	}
	for i := range 2 {
		c := &controller{identity: fmt.Sprintf("replica-%d", i), kubeconfig: ctrlKC}
		if err := e.writeController(c); err != nil {
			return e, err
		}
		e.controllers = append(e.controllers, c)
		if err := e.startController(c); err != nil {
			return e, err
		}
	}
	for _, n := range nodes {
		if _, err := e.addAgent(ctx, n, false); err != nil {
			return e, err
		}
	}
	for _, n := range nodes {
		if err := e.waitAgentReady(ctx, e.agents[n]); err != nil {
			return e, err
		}
	}
	return e, nil
}

// addAgent creates the Node object, a token of the agent's service account
// bound to the Node (or, podBound, to a Pod on it, as a DaemonSet's pod
// has), the agent's config, and starts it.
func (e *env) addAgent(ctx context.Context, node string, podBound bool) (*agent, error) {
	if _, err := e.cp.CreateNode(ctx, node); err != nil {
		return nil, err
	}
	d := filepath.Join(e.dir, "agents", node)
	for _, sub := range []string{"state", "sockets"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o700); err != nil {
			return nil, err
		}
	}
	a := &agent{node: node, config: filepath.Join(d, "config.yaml"), kubeconfig: filepath.Join(d, "kubeconfig"),
		socket: filepath.Join(d, "sockets", "agent.sock")}
	if podBound {
		// The pod never runs (no kubelet): it is what the token is bound to.
		pod, err := e.cp.Client.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "csi-agent-" + node, Namespace: namespace},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: agentSA,
				Containers: []corev1.Container{{Name: "agent", Image: "csi-agent:never-pulled"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			return nil, err
		}
		if err := e.cp.PodServiceAccountKubeconfig(ctx, pod, a.kubeconfig); err != nil {
			return nil, err
		}
	} else if err := e.cp.ServiceAccountKubeconfig(ctx, namespace, agentSA, node, a.kubeconfig); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	a.metrics = fmt.Sprintf("127.0.0.1:%d", port)
	cfg := map[string]any{
		"trustDomain": trustDomain,
		"nodeName":    node,
		"stateDir":    filepath.Join(d, "state"),
		"workloadAPI": map[string]any{"socketDir": filepath.Join(d, "sockets"), "socketName": "agent.sock"},
		"csi":         map[string]any{"socket": ""},
		"kubernetes":  map[string]any{"enabled": false},
		"ca": map[string]any{
			"mode":        "cluster",
			"x509SVIDTTL": x509SVIDTTL,
			"jwtSVIDTTL":  "1m",
			"cluster": map[string]any{
				"kubeconfig":      a.kubeconfig,
				"namespace":       namespace,
				"intermediateTTL": requestedIntermediateTTL,
			},
		},
		// The test process (root) is the workload: Unix attestation only.
		"svids": []any{map[string]any{
			"spiffeID": "/cluster-test/uid/{unix.uid}",
			"rules":    []any{map[string]any{"match": map[string]any{"unix.uid": "0"}}},
		}},
		"metrics": map[string]any{"addr": a.metrics},
	}
	if err := writeYAML(a.config, cfg); err != nil {
		return nil, err
	}
	e.agents[node] = a
	return a, e.cp.StartProcess(a.proc(), e.bin, "run", "--config", a.config, "-v=2")
}

// removeAgent stops an agent a case added and deletes its Node and Pod.
func (e *env) removeAgent(a *agent) {
	if err := e.cp.StopProcess(a.proc(), 10*time.Second); err != nil {
		e.logf("stop %s: %v", a.proc(), err)
	}
	ctx := context.Background()
	_ = e.cp.Client.CoreV1().Nodes().Delete(ctx, a.node, metav1.DeleteOptions{})
	zero := int64(0) // no kubelet confirms a graceful deletion
	_ = e.cp.Client.CoreV1().Pods(namespace).Delete(ctx, "csi-agent-"+a.node, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	delete(e.agents, a.node)
}

func (e *env) writeController(c *controller) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	c.metrics = fmt.Sprintf("127.0.0.1:%d", port)
	c.config = filepath.Join(e.dir, "controller-"+c.identity+".yaml")
	return writeYAML(c.config, map[string]any{
		"trustDomain": trustDomain,
		"metrics":     map[string]any{"addr": c.metrics},
		"controller": map[string]any{
			"namespace":              namespace,
			"identity":               c.identity,
			"rootActivationDelay":    rootActivationDelay.String(),
			"maxIntermediateTTL":     intermediateTTL.String(),
			"defaultIntermediateTTL": intermediateTTL.String(),
			"agentServiceAccounts":   []any{namespace + ":" + agentSA},
			// Fast failover: the test kills the leader.
			"leaseDuration": "4s",
			"renewDeadline": "3s",
			"retryPeriod":   "1s",
		},
	})
}

func (e *env) startController(c *controller) error {
	return e.cp.StartProcess(c.proc(), e.bin, "controller", "--config", c.config, "--kubeconfig", c.kubeconfig)
}

// waitAgentReady waits for the agent's /readyz: it holds an intermediate
// and the bundle.
func (e *env) waitAgentReady(ctx context.Context, a *agent) error {
	return e.waitReady(ctx, a.proc(), a.metrics, 2*time.Minute)
}

func (e *env) waitReady(ctx context.Context, proc, addr string, d time.Duration) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, d, true, func(ctx context.Context) (bool, error) {
		if err := e.cp.ProcessExited(proc); err != nil {
			return false, fmt.Errorf("%w: %s", err, tail(e.cp.LogPath(proc)))
		}
		ok, msg := ready(ctx, addr)
		last = msg
		return ok, nil
	})
	if err != nil {
		return fmt.Errorf("%s not ready (%s): %w; log: %s", proc, last, err, tail(e.cp.LogPath(proc)))
	}
	return nil
}

func ready(ctx context.Context, addr string) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/readyz?verbose", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	b := make([]byte, 2048)
	n, _ := resp.Body.Read(b)
	return resp.StatusCode == http.StatusOK, strings.TrimSpace(string(b[:n]))
}

// tail is the end of a log, for failure messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	const max = 3000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return "\n" + string(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func writeYAML(path string, v any) error {
	b, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// access is one permission cluster mode needs (CLUSTER.md, RBAC).
type access struct {
	sa                             string
	ns, group, resource, sub, verb string
	name                           string
}

// needed lists what each service account must be allowed and nothing the
// test adds on its own: the deploy RBAC must grant it.
func needed() []access {
	var out []access
	add := func(sa, ns, group, resource, sub, name string, verbs ...string) {
		for _, v := range verbs {
			out = append(out, access{sa: sa, ns: ns, group: group, resource: resource, sub: sub, verb: v, name: name})
		}
	}
	const certs = "certificates.k8s.io"
	add(agentSA, "", certs, "certificatesigningrequests", "", "", "create", "get", "list", "watch")
	add(agentSA, "", certs, "clustertrustbundles", "", "", "get", "list", "watch")
	add(agentSA, namespace, "", "configmaps", "", cluster.JWKSConfigMap, "get", "list", "watch")
	add(controllerSA, "", certs, "certificatesigningrequests", "", "", "get", "list", "watch")
	add(controllerSA, "", certs, "certificatesigningrequests", "approval", "", "update")
	add(controllerSA, "", certs, "certificatesigningrequests", "status", "", "update")
	add(controllerSA, "", certs, "signers", "", cluster.IntermediateSigner, "approve", "sign")
	add(controllerSA, "", certs, "signers", "", cluster.JWTKeySigner, "approve", "sign")
	add(controllerSA, "", certs, "signers", "", cluster.SVIDSigner, "attest", "sign")
	add(controllerSA, "", certs, "clustertrustbundles", "", "", "get", "list", "watch", "create", "update")
	add(controllerSA, "", "", "nodes", "", "", "get", "list", "watch")
	add(controllerSA, "", "", "pods", "", "", "get", "list", "watch")
	add(controllerSA, "", certs, "podcertificaterequests", "", "", "get", "list", "watch")
	add(controllerSA, "", certs, "podcertificaterequests", "status", "", "update")
	add(controllerSA, namespace, "", "secrets", "", cluster.RootSecret, "get", "update")
	add(controllerSA, namespace, "", "secrets", "", "", "create")
	add(controllerSA, namespace, "", "configmaps", "", "", "get", "list", "watch", "create", "update")
	add(controllerSA, namespace, "coordination.k8s.io", "leases", "", "", "get", "create", "update")
	return out
}

// missing returns the needed permissions the API server's authorizer denies.
func (e *env) missing(ctx context.Context) ([]access, error) {
	var out []access
	for _, a := range needed() {
		r, err := e.cp.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
			User:   "system:serviceaccount:" + namespace + ":" + a.sa,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"},
			ResourceAttributes: &authzv1.ResourceAttributes{Namespace: a.ns, Group: a.group, Resource: a.resource,
				Subresource: a.sub, Verb: a.verb, Name: a.name},
		}}, metav1.CreateOptions{})
		if err != nil {
			return nil, err
		}
		if !r.Status.Allowed {
			out = append(out, a)
		}
	}
	return out, nil
}

// deployRBACMissing is what the deploy manifests left out (nil when they
// grant everything), kept for TestDeployRBACGrantsClusterMode.
var deployRBACMissing []access

// applyRBAC applies the service accounts and RBAC of the deploy manifests
// (deploy/kind, and deploy/kind/controller when it exists). What they do
// not grant yet is granted from CLUSTER.md's list so that the other cases
// still run; TestDeployRBACGrantsClusterMode reports the gap.
func (e *env) applyRBAC(ctx context.Context) error {
	a, err := framework.NewApplier(e.cp.Rest)
	if err != nil {
		return err
	}
	var objs []*unstructured.Unstructured
	for _, d := range []string{"deploy/kind", "deploy/kind/controller"} {
		dir := filepath.Join(e.repo, d)
		if _, err := os.Stat(filepath.Join(dir, "kustomization.yaml")); err != nil {
			continue
		}
		o, err := framework.Kustomize(dir)
		if err != nil {
			return err
		}
		objs = append(objs, o...)
	}
	applied := 0
	for _, o := range objs {
		switch o.GetKind() {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			if err := a.Apply(ctx, o, false); err != nil {
				return err
			}
			applied++
		}
	}
	for _, sa := range []string{agentSA, controllerSA} {
		if err := e.cp.EnsureServiceAccount(ctx, namespace, sa); err != nil {
			return err
		}
	}
	var miss []access
	// RBAC reaches the authorizer's cache within moments.
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 5*time.Second, true, func(ctx context.Context) (bool, error) {
		m, err := e.missing(ctx)
		miss = m
		return err == nil && len(m) == 0, err
	})
	if err != nil && !errors.Is(err, context.DeadlineExceeded) && !wait.Interrupted(err) {
		return err
	}
	deployRBACMissing = miss
	e.logf("RBAC: %d deploy objects applied, %d needed permissions missing from them", applied, len(miss))
	if len(miss) == 0 {
		return nil
	}
	return e.grant(ctx, miss)
}

// grant gives each missing permission with one role per service account.
func (e *env) grant(ctx context.Context, miss []access) error {
	rules := map[string][]rbacv1.PolicyRule{}
	nsRules := map[string][]rbacv1.PolicyRule{}
	for _, m := range miss {
		res := m.resource
		if m.sub != "" {
			res += "/" + m.sub
		}
		r := rbacv1.PolicyRule{APIGroups: []string{m.group}, Resources: []string{res}, Verbs: []string{m.verb}}
		if m.name != "" {
			r.ResourceNames = []string{m.name}
		}
		if m.ns != "" {
			nsRules[m.sa] = append(nsRules[m.sa], r)
		} else {
			rules[m.sa] = append(rules[m.sa], r)
		}
	}
	// Events are not checked (core or events.k8s.io, as the controller
	// chooses) but granted along with the rest.
	if _, ok := rules[controllerSA]; ok {
		rules[controllerSA] = append(rules[controllerSA], rbacv1.PolicyRule{APIGroups: []string{"", "events.k8s.io"}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}})
	}
	rbac := e.cp.Client.RbacV1()
	for sa, rs := range rules {
		name := "cluster-test-" + sa
		subj := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: namespace}}
		if _, err := rbac.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rs}, metav1.CreateOptions{}); err != nil {
			return err
		}
		if _, err := rbac.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
			RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: name}, Subjects: subj}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	for sa, rs := range nsRules {
		name := "cluster-test-" + sa
		subj := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: namespace}}
		if _, err := rbac.Roles(namespace).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rs}, metav1.CreateOptions{}); err != nil {
			return err
		}
		if _, err := rbac.RoleBindings(namespace).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
			RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: name}, Subjects: subj}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	return nil
}
