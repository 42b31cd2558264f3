package podcert

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	certv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"
)

// runController starts a Controller on client and stops it at cleanup.
func runController(t *testing.T, client *fake.Clientset, ca *testCA) {
	t.Helper()
	c, err := New(client, Options{TrustDomain: testTD, Rules: testRules(t), Signer: ca, MaxTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

// waitDecided polls the request until it carries a terminal condition.
func waitDecided(t *testing.T, client *fake.Clientset, ns, name string) *certv1.PodCertificateRequest {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		pcr, err := client.CertificatesV1().PodCertificateRequests(ns).Get(t.Context(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if terminal(pcr) {
			return pcr
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("PodCertificateRequest %s/%s not decided", ns, name)
	return nil
}

func TestControllerIssuesAndDenies(t *testing.T) {
	key := p256(t)
	w := newWorld(t, key)
	other := newWorld(t, key)
	other.pod.Name, other.pod.UID, other.pod.Spec.ServiceAccountName = "stranger", "stranger-uid", "nobody"
	other.sa.Name, other.sa.UID = "nobody", "nobody-uid"
	other.pcr.Name = "req-2"
	other.pcr.Spec.PodName, other.pcr.Spec.PodUID = "stranger", "stranger-uid"
	other.pcr.Spec.ServiceAccountName, other.pcr.Spec.ServiceAccountUID = "nobody", "nobody-uid"
	foreign := newWorld(t, key)
	foreign.pcr.Name = "req-foreign"
	foreign.pcr.Spec.SignerName = "example.com/other"
	shortLived := newWorld(t, key)
	shortLived.pcr.Name = "req-short"
	shortLived.pcr.Spec.MaxExpirationSeconds = ptr.To[int32](3600)

	client := fake.NewClientset(w.pod, w.node, w.sa, other.pod, other.sa)
	// The first pod GET fails: the request must be retried, not decided.
	var failed atomic.Bool
	client.PrependReactor("get", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		if failed.CompareAndSwap(false, true) {
			return true, nil, errors.New("connection refused")
		}
		return false, nil, nil
	})
	ca := newTestCA(t, 365*24*time.Hour)
	runController(t, client, ca)
	for _, pcr := range []*certv1.PodCertificateRequest{w.pcr, other.pcr, foreign.pcr, shortLived.pcr} {
		if _, err := client.CertificatesV1().PodCertificateRequests(pcr.Namespace).Create(t.Context(), pcr, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	issued := waitDecided(t, client, "shop", "req-1")
	if !failed.Load() {
		t.Error("the failing pod GET was never made")
	}
	leaf := checkIssued(t, issued, ca, "spiffe://example.org/ns/shop/sa/web")
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != 24*time.Hour {
		t.Errorf("lifetime %s, want 24h", got)
	}
	if want := leaf.NotBefore.Add(12 * time.Hour); !issued.Status.BeginRefreshAt.Time.Equal(want) {
		t.Errorf("beginRefreshAt %s, want half life %s", issued.Status.BeginRefreshAt.Time, want)
	}

	short := waitDecided(t, client, "shop", "req-short")
	leaf = checkIssued(t, short, ca, "spiffe://example.org/ns/shop/sa/web")
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != time.Hour {
		t.Errorf("lifetime %s, want maxExpirationSeconds 1h", got)
	}

	deniedPCR := waitDecided(t, client, "shop", "req-2")
	c := deniedPCR.Status.Conditions
	if len(c) != 1 || c[0].Type != certv1.PodCertificateRequestConditionTypeDenied || c[0].Reason != ReasonNoMatchingRule ||
		!strings.Contains(c[0].Message, "pod shop/stranger (service account nobody, node n1)") || deniedPCR.Status.CertificateChain != "" {
		t.Errorf("status %+v, want Denied %s naming the pod", deniedPCR.Status, ReasonNoMatchingRule)
	}

	// Another signer's request stays untouched.
	time.Sleep(100 * time.Millisecond)
	got, err := client.CertificatesV1().PodCertificateRequests("shop").Get(t.Context(), "req-foreign", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Status.Conditions) != 0 {
		t.Errorf("another signer's request got %+v", got.Status.Conditions)
	}
}

// checkIssued verifies an Issued status the way the API server and a TLS
// peer would, and returns the leaf.
func checkIssued(t *testing.T, pcr *certv1.PodCertificateRequest, ca *testCA, wantID string) *x509.Certificate {
	t.Helper()
	c := pcr.Status.Conditions
	if len(c) != 1 || c[0].Type != certv1.PodCertificateRequestConditionTypeIssued || c[0].Status != metav1.ConditionTrue || c[0].Reason == "" {
		t.Fatalf("conditions %+v, want one Issued", c)
	}
	var chain []*x509.Certificate
	rest := []byte(pcr.Status.CertificateChain)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	if len(chain) == 0 {
		t.Fatal("no certificate in the chain")
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(testTD, []*x509.Certificate{ca.root}))
	if err != nil {
		t.Fatalf("chain does not verify to the root: %v", err)
	}
	if id.String() != wantID {
		t.Fatalf("SPIFFE ID %s, want %s", id, wantID)
	}
	leaf := chain[0]
	s := pcr.Status
	if !s.NotBefore.Time.Equal(leaf.NotBefore) || !s.NotAfter.Time.Equal(leaf.NotAfter) {
		t.Fatalf("status times %s..%s, leaf %s..%s", s.NotBefore, s.NotAfter, leaf.NotBefore, leaf.NotAfter)
	}
	return leaf
}

func TestNewRejects(t *testing.T) {
	client := fake.NewClientset()
	ok := Options{TrustDomain: testTD, Rules: testRules(t), Signer: newTestCA(t, time.Hour)}
	tests := []struct {
		name string
		edit func(*Options)
	}{
		{"no trust domain", func(o *Options) { o.TrustDomain = spiffeid.TrustDomain{} }},
		{"no rules", func(o *Options) { o.Rules = nil }},
		{"no signer", func(o *Options) { o.Signer = nil }},
		{"max TTL under the API minimum", func(o *Options) { o.MaxTTL = time.Minute }},
		{"refresh fraction 1", func(o *Options) { o.RefreshFraction = 1 }},
	}
	if _, err := New(client, ok); err != nil {
		t.Fatalf("valid options: %v", err)
	}
	if _, err := New(nil, ok); err == nil {
		t.Error("nil client accepted")
	}
	for _, tt := range tests {
		o := ok
		tt.edit(&o)
		if _, err := New(client, o); err == nil {
			t.Errorf("%s: accepted", tt.name)
		}
	}
}
