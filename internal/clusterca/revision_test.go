package clusterca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/cluster"
	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

func TestResourceRevision(t *testing.T) {
	for rv, want := range map[string]uint64{"": 0, "42": 42, "18446744073709551615": 1<<64 - 1, "-1": 0, "abc": 0, "1e3": 0, "18446744073709551616": 0} {
		if got := resourceRevision(rv); got != want {
			t.Errorf("resourceRevision(%q) = %d, want %d", rv, got, want)
		}
	}
}

// TestTrustRevision: the revision is the larger resourceVersion of the
// objects the trust comes from, and it never goes back.
func TestTrustRevision(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	const ns = "csi-agent"
	cs := fake.NewClientset()
	c, err := NewTrust(cs, Options{TrustDomain: td, Namespace: ns, IntermediateSigner: cluster.IntermediateSigner,
		JWTKeySigner: cluster.JWTKeySigner, BundleSigner: cluster.SVIDSigner})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	ctb := &certv1.ClusterTrustBundle{ObjectMeta: metav1.ObjectMeta{Name: "b", ResourceVersion: "10",
		Labels: map[string]string{cluster.TrustDomainLabel: td.Name()}}, Spec: certv1.ClusterTrustBundleSpec{SignerName: cluster.SVIDSigner}}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := cluster.KeyID(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	jwks, err := cluster.MarshalJWKS([]cluster.JWTKey{{Node: "n", KeyID: kid, Public: k.Public(), NotAfter: time.Now().Add(time.Hour).Truncate(time.Second)}})
	if err != nil {
		t.Fatal(err)
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: cluster.JWKSConfigMap, Namespace: ns, ResourceVersion: "7"},
		Data: map[string]string{cluster.JWKSKey: string(jwks)}}
	steps := []struct {
		name string
		do   func() error
		want uint64
		// seen tells that the step reached the trust (keys, roots), so a
		// revision that fails to move back is not just a late event.
		seen func(ca.Trust) bool
	}{
		{"bundle", func() error {
			_, err := cs.CertificatesV1().ClusterTrustBundles().Create(ctx, ctb, metav1.CreateOptions{})
			return err
		}, 10, nil},
		{"older ConfigMap", func() error {
			_, err := cs.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{})
			return err
		}, 10, func(t ca.Trust) bool { return len(t.JWTKeys) == 1 }},
		{"newer ConfigMap", func() error {
			cm.ResourceVersion = "12"
			_, err := cs.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{})
			return err
		}, 12, nil},
		{"ConfigMap deleted", func() error { return cs.CoreV1().ConfigMaps(ns).Delete(ctx, cm.Name, metav1.DeleteOptions{}) }, 12,
			func(t ca.Trust) bool { return len(t.JWTKeys) == 0 }},
		{"not a number", func() error {
			ctb.ResourceVersion, ctb.Spec.TrustBundle = "x", rootPEM(t)
			_, err := cs.CertificatesV1().ClusterTrustBundles().Update(ctx, ctb, metav1.UpdateOptions{})
			return err
		}, 12, func(t ca.Trust) bool { return len(t.Roots) == 1 }},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		var got uint64
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			tr, rev, ok := c.TrustRevision()
			if got = rev; ok && rev == st.want && (st.seen == nil || st.seen(tr)) {
				break
			}
		}
		if tr, _, _ := c.TrustRevision(); got != st.want || st.seen != nil && !st.seen(tr) {
			t.Fatalf("%s: revision %d, want %d (trust %d roots, %d keys)", st.name, got, st.want, len(tr.Roots), len(tr.JWTKeys))
		}
	}
}

func rootPEM(t *testing.T) string {
	t.Helper()
	root, err := issue.Root(spiffeid.RequireTrustDomainFromString("example.org"), time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return string(rootca.EncodeCertificates([]*x509.Certificate{root.Cert}))
}
