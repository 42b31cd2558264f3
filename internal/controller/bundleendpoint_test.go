package controller

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/csi-agent/csi-agent/internal/controller/issue"
	"github.com/csi-agent/csi-agent/internal/controller/rootca"
)

// TestEndpointSVIDs: a standby signs with the root Secret's root, keeps
// the SVID until half life, serves it while the Secret cannot be read, and
// the leader signs with the root it holds.
func TestEndpointSVIDs(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id := spiffeid.RequireFromPath(td, "/be")
	var mu sync.Mutex
	now := time.Now().Truncate(time.Second)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	secretRoot, err := issue.Root(td, now.Add(-time.Minute), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaderRoot, err := issue.Root(td, now.Add(-time.Minute), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	data, ann, err := rootca.State{Current: secretRoot}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "root", Namespace: "ns", Annotations: ann}, Data: data})
	holder := rootca.NewHolder(td, clock)
	s := NewEndpointSVIDs(client, holder, EndpointSVIDOptions{TrustDomain: td, Namespace: "ns", RootSecret: "root", TTL: time.Hour, Now: clock})
	ctx := context.Background()

	steps := []struct {
		name       string
		before     func()
		wantMinted bool
		wantIssuer *issue.Parent
		wantErr    bool
	}{
		{name: "standby signs with the Secret's root", wantMinted: true, wantIssuer: &secretRoot},
		{name: "cached before half life", before: func() { advance(20 * time.Minute) }, wantIssuer: &secretRoot},
		{name: "renewed after half life", before: func() { advance(20 * time.Minute) }, wantMinted: true, wantIssuer: &secretRoot},
		{name: "Secret gone: the current one while valid", before: func() {
			advance(40 * time.Minute)
			if err := client.CoreV1().Secrets("ns").Delete(ctx, "root", metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}, wantIssuer: &secretRoot},
		{name: "Secret gone and expired", before: func() { advance(30 * time.Minute) }, wantErr: true},
		{name: "leader signs with its root", before: func() { holder.Set(rootca.State{Current: leaderRoot}) }, wantMinted: true, wantIssuer: &leaderRoot},
	}
	for _, st := range steps {
		if st.before != nil {
			st.before()
		}
		svid, minted, err := s.X509SVID(ctx, id, nil)
		if st.wantErr {
			if err == nil {
				t.Fatalf("%s: no error", st.name)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		leaf := svid.Certificates[0]
		if minted != st.wantMinted || svid.ID != id || leaf.CheckSignatureFrom(st.wantIssuer.Cert) != nil || !clock().Before(leaf.NotAfter) {
			t.Fatalf("%s: minted %v (want %v), id %s, issuer %s, expires %s", st.name, minted, st.wantMinted, svid.ID, leaf.Issuer, leaf.NotAfter)
		}
	}
}
