package e2e

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The deploy RBAC gives the agent what its kubelet client needs and nothing
// more; asked of the API server's own authorizer. GET /pods is "get
// nodes/pods" on kubelets with fine-grained authorization (v1.33+: this
// node's v1.37 and the v1.33 smoke); nodes/proxy, which would also authorize exec, is
// only in the optional components/kubelet-nodes-proxy. The agent attesting
// pods at all in the other tests shows the kubelet accepts nodes/pods.
func TestAgentRBACIsMinimal(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	user := "system:serviceaccount:" + framework.AgentNamespace + ":" + framework.AgentSA
	for _, c := range []struct {
		verb, resource, sub, ns string
		allowed                 bool
	}{
		{"get", "nodes", "pods", "", true},
		{"get", "nodes", "proxy", "", false},
		{"get", "pods", "", "e2e-basic", true},
		{"list", "pods", "", "", false},
		{"watch", "pods", "", "", false},
		{"create", "pods", "exec", "e2e-basic", false},
		{"get", "secrets", "", framework.AgentNamespace, false},
		{"get", "nodes", "", "", false},
		{"get", "nodes", "log", "", false},
		{"create", "nodes", "proxy", "", false},
		{"create", "serviceaccounts", "token", "e2e-basic", false},
	} {
		sar, err := suite.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
			User:               user,
			Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + framework.AgentNamespace, "system:authenticated"},
			ResourceAttributes: &authzv1.ResourceAttributes{Verb: c.verb, Resource: c.resource, Subresource: c.sub, Namespace: c.ns},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != c.allowed {
			t.Errorf("%s %s/%s in %q: allowed=%v, want %v (%s)", c.verb, c.resource, c.sub, c.ns, sar.Status.Allowed, c.allowed, sar.Status.Reason)
		}
	}
}

// The shipped config verifies the kubelet: no skip-verify, and a CA file
// (the kubelet's own kubelet.crt on kind and kubeadm nodes). This node's
// kubelet serves its certificate from that path, so every test that
// attests a pod also shows the token went to a verified kubelet.
func TestDeployConfigVerifiesKubelet(t *testing.T) {
	objs, err := framework.Kustomize(filepath.Join("..", "..", "deploy", "kind"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := framework.AgentConfig(objs, nil)
	if err != nil {
		t.Fatal(err)
	}
	k8s, _ := cfg["kubernetes"].(map[string]any)
	kubelet, _ := k8s["kubelet"].(map[string]any)
	if kubelet == nil {
		t.Fatalf("no kubernetes.kubelet in the deploy config: %v", cfg)
	}
	for _, key := range []string{"insecureSkipVerify", "sendTokenUnverified"} {
		if v, ok := kubelet[key]; ok && v != false {
			t.Errorf("deploy config sets kubernetes.kubelet.%s: %v", key, v)
		}
	}
	if ca, _ := kubelet["caFile"].(string); ca != "/var/lib/kubelet/pki/kubelet.crt" {
		t.Errorf("kubernetes.kubelet.caFile = %q, want the kubelet's own /var/lib/kubelet/pki/kubelet.crt", ca)
	}
}
