package cluster

import "testing"

// The deploy manifests grant both service accounts what cluster mode needs
// (CLUSTER.md's RBAC); the suite fills any gap itself so the other cases
// run, and this case names it.
func TestDeployRBACGrantsClusterMode(t *testing.T) {
	needAgents(t)
	for _, m := range deployRBACMissing {
		res := m.resource
		if m.sub != "" {
			res += "/" + m.sub
		}
		t.Errorf("deploy RBAC does not let %s/%s %s %s.%s (namespace %q, name %q)", namespace, m.sa, m.verb, res, m.group, m.ns, m.name)
	}
}
