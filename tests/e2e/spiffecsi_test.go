package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

// spiffe-csi's example/config/workload-1.yaml, byte for byte: tests/helm
// vendors it and pins its sha256 (tests/helm/testdata/README.md).
const (
	spiffeCSIManifest       = "../helm/testdata/spiffe-csi-workload.yaml"
	spiffeCSIManifestSHA256 = "ed645f3179a545147a671c8f5f92ccffdebcef480ce44c664c748513fa286d60"
	spiffeCSIAliasTarget    = "spire-agent.sock"
)

func init() {
	// The manifest's pod runs in namespace default as its default service
	// account: that namespace gets the ns/sa identity like the others.
	defaultIDNamespaces = append(defaultIDNamespaces, "default")
}

// With the spiffe-csi drop-in deployed (run.sh --spiffe-csi: deploy/kind
// with components/spiffe-csi), spiffe-csi's own example workload manifest,
// unchanged, gets its SVID. What this node lacks of a cluster is done here
// as a cluster's controllers would do it, never by changing the manifest:
// the namespace's default service account and the kube-root-ca.crt
// ConfigMap (kube-controller-manager), the binding to the node
// (kube-scheduler), and the namespace kubectl would take from its context.
func TestSpiffeCSIManifestRunsUnchanged(t *testing.T) {
	needCluster(t)
	if suite.local == nil || os.Getenv(framework.ComponentEnv) != framework.SpiffeCSIComponent {
		t.Skip("the spiffe-csi drop-in case: bash tests/e2e/run.sh --spiffe-csi")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	raw, err := os.ReadFile(spiffeCSIManifest)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != spiffeCSIManifestSHA256 {
		t.Fatalf("%s is not spiffe-csi's manifest as published (sha256 %x)", spiffeCSIManifest, sum)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(raw, &pod); err != nil {
		t.Fatal(err)
	}
	const ns = "default"
	pod.Namespace = ns
	ensureNamespace(ctx, t, ns)
	ca, err := os.ReadFile(suite.local.Rest.TLSClientConfig.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	root := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kube-root-ca.crt", Namespace: ns}, Data: map[string]string{"ca.crt": string(ca)}}
	if _, err := suite.client.CoreV1().ConfigMaps(ns).Create(ctx, root, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	created := createPod(ctx, t, &pod)
	if err := suite.client.CoreV1().Pods(ns).Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: created.Name, Namespace: ns, UID: created.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: suite.node.Name()},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("bind %s to %s: %v", created.Name, suite.node.Name(), err)
	}
	e, evs := firstSVID(ctx, t, created)
	if want := nsSAID(ns, "default"); !sameIDs(e.IDs, want) || !e.Verified {
		t.Fatalf("the spiffe-csi workload got %v (chain verified: %v), want %s%s", e.IDs, e.Verified, want, describeEvents(evs))
	}
	running := getPod(ctx, t, created)
	t.Logf("%s/%s (image %s, its own network: pod IP %s) got %v, %.1fs after it was created",
		ns, running.Name, running.Spec.Containers[0].Image, running.Status.PodIP, e.IDs, e.Time.Sub(running.CreationTimestamp.Time).Seconds())
	// SPIRE's chart's other names of the socket, beside spire-agent.sock in
	// the directory the volume mounts.
	wl, _ := suite.local.AgentConfig["workloadAPI"].(map[string]any)
	dir, _ := wl["socketDir"].(string)
	for _, alias := range []string{"socket", "api.sock"} {
		if target, err := os.Readlink(filepath.Join(dir, alias)); err != nil || target != spiffeCSIAliasTarget {
			t.Errorf("socket alias %s -> %q (%v), want %s", alias, target, err, spiffeCSIAliasTarget)
		}
	}
}
