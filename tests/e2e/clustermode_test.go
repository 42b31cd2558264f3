package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certsv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

// In cluster mode (deploy/kind's default) the agent on the real kubelet got
// its intermediate from the controller through the CSR API, as its service
// account on this node; the controller holds the lease and publishes the
// roots and this node's JWT key. (The other cases verify the workloads'
// chains against the bundle the agent serves: the published roots.)
func TestAgentRunsInClusterMode(t *testing.T) {
	needCluster(t)
	if suite.local != nil && !suite.local.Cluster {
		t.Skip("deployed without the controller (components/self-managed)")
	}
	ctx := context.Background()
	node := suite.node.Name()
	td, err := spiffeid.TrustDomainFromString(suite.trustDomain)
	if err != nil {
		t.Fatal(err)
	}
	csrs, err := suite.client.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	approved := map[string]bool{}
	for _, c := range csrs.Items {
		if !slices.Equal(c.Spec.Extra[cluster.NodeNameExtra], []string{node}) {
			continue
		}
		if want := "system:serviceaccount:" + framework.AgentNamespace + ":" + framework.AgentSA; c.Spec.Username != want {
			t.Errorf("CSR %s from node %s by %q, want %q", c.Name, node, c.Spec.Username, want)
		}
		for _, cond := range c.Status.Conditions {
			if cond.Type == certsv1.CertificateApproved && cond.Status == corev1.ConditionTrue && cond.Reason == cluster.ReasonApproved && len(c.Status.Certificate) > 0 {
				approved[c.Spec.SignerName] = true
			}
		}
	}
	for _, signer := range []string{cluster.IntermediateSigner, cluster.JWTKeySigner} {
		if !approved[signer] {
			t.Errorf("no approved and issued %s CSR from node %s", signer, node)
		}
	}
	ctb, err := suite.client.CertificatesV1().ClusterTrustBundles().Get(ctx, cluster.TrustBundleName(cluster.SVIDSigner, td), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("ClusterTrustBundle: %v", err)
	}
	if !strings.Contains(ctb.Spec.TrustBundle, "BEGIN CERTIFICATE") || ctb.Spec.SignerName != cluster.SVIDSigner {
		t.Errorf("ClusterTrustBundle %s: signer %q, bundle %q", ctb.Name, ctb.Spec.SignerName, ctb.Spec.TrustBundle)
	}
	cm, err := suite.client.CoreV1().ConfigMaps(framework.AgentNamespace).Get(ctx, cluster.JWKSConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("JWKS ConfigMap: %v", err)
	}
	keys, err := cluster.ParseJWKS([]byte(cm.Data[cluster.JWKSKey]))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(keys, func(k cluster.JWTKey) bool { return k.Node == node }) {
		t.Errorf("JWKS has no key of node %s: %+v", node, keys)
	}
	lease, err := suite.client.CoordinationV1().Leases(framework.AgentNamespace).Get(ctx, cluster.Lease, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	if h := lease.Spec.HolderIdentity; h == nil || !strings.HasPrefix(*h, framework.ControllerDeployment) {
		t.Errorf("lease %s held by %v, want a controller pod", cluster.Lease, h)
	}
}
