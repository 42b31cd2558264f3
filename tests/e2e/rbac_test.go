package e2e

import (
	"context"
	"testing"

	"github.com/csi-agent/csi-agent/tests/e2e/framework"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The deploy RBAC gives the agent what its kubelet client needs and nothing
// more; asked of the API server's own authorizer.
func TestAgentRBACIsMinimal(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	user := "system:serviceaccount:" + framework.AgentNamespace + ":" + framework.AgentSA
	for _, c := range []struct {
		verb, resource, sub, ns string
		allowed                 bool
	}{
		{"get", "nodes", "proxy", "", true},
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
