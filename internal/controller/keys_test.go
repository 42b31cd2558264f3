package controller

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

func TestKeyWatcher(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset()
	w, err := NewKeyWatcher(client, "csi-agent", cluster.JWKSConfigMap)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	eventually(t, "the first list", w.Synced)

	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kid, _ := cluster.KeyID(k.Public())
	data, err := cluster.MarshalJWKS([]cluster.JWTKey{{Node: "a", KeyID: kid, Public: k.Public(), NotAfter: time.Now().Add(time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	cms := client.CoreV1().ConfigMaps("csi-agent")
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: cluster.JWKSConfigMap, Namespace: "csi-agent"}, Data: map[string]string{cluster.JWKSKey: string(data)}}
	if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the published key", func() bool { keys := w.Keys(); return len(keys) == 1 && keys[0].KeyID == kid })

	// A JWKS that does not parse keeps the keys served; deletion empties them.
	cm.Data[cluster.JWKSKey] = `{"keys":[{"node":""}]}`
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if len(w.Keys()) != 1 {
		t.Fatal("a broken JWKS replaced the keys served")
	}
	if err := cms.Delete(ctx, cluster.JWKSConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no keys after deletion", func() bool { return len(w.Keys()) == 0 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
