package cluster

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// The API server serves what cluster mode uses, at the version it uses.
func TestControlPlaneServesClusterAPIs(t *testing.T) {
	needCluster(t)
	res, err := suite.cp.Client.Discovery().ServerResourcesForGroupVersion("certificates.k8s.io/v1")
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]bool{}
	for _, r := range res.APIResources {
		served[r.Name] = true
	}
	for _, want := range []string{"certificatesigningrequests", "certificatesigningrequests/approval", "certificatesigningrequests/status",
		"clustertrustbundles", "podcertificaterequests", "podcertificaterequests/status"} {
		if !served[want] {
			t.Errorf("certificates.k8s.io/v1 does not serve %s (serves %v)", want, served)
		}
	}
}

// The framework's identities are the ones the API server sees: a node-bound
// service-account token carries the node name, a client certificate its
// user and groups.
func TestControlPlaneIdentities(t *testing.T) {
	needCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const node = "identity-node"
	if _, err := suite.cp.CreateNode(ctx, node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = suite.cp.Client.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
	})
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := suite.cp.ServiceAccountKubeconfig(ctx, "identity-ns", "identity-sa", node, kc); err != nil {
		t.Fatal(err)
	}
	saCfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		t.Fatal(err)
	}
	nodeCfg, err := suite.cp.UserConfig("system:node:"+node, []string{"system:nodes"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		cfg      *rest.Config
		user     string
		group    string
		nodeName string
	}{
		{"node-bound service account token", saCfg, "system:serviceaccount:identity-ns:identity-sa", "system:serviceaccounts:identity-ns", node},
		{"client certificate", nodeCfg, "system:node:" + node, "system:nodes", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := whoAmI(ctx, t, tc.cfg)
			if u.Username != tc.user {
				t.Errorf("username %q, want %q", u.Username, tc.user)
			}
			if !contains(u.Groups, tc.group) {
				t.Errorf("groups %v lack %q", u.Groups, tc.group)
			}
			got := u.Extra["authentication.kubernetes.io/node-name"]
			if tc.nodeName == "" && len(got) != 0 || tc.nodeName != "" && (len(got) != 1 || got[0] != tc.nodeName) {
				t.Errorf("node-name extra %v, want %q", got, tc.nodeName)
			}
		})
	}
}

func whoAmI(ctx context.Context, t *testing.T, cfg *rest.Config) authv1.UserInfo {
	t.Helper()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview: %v", err)
	}
	return r.Status.UserInfo
}

func contains(xs []string, x string) bool {
	for _, s := range xs {
		if s == x {
			return true
		}
	}
	return false
}
