package podcert

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	k8sattestor "github.com/csi-agent/csi-agent/attestor/k8s"
	"github.com/csi-agent/csi-agent/internal/cluster"
)

const (
	condDenied = certv1.PodCertificateRequestConditionTypeDenied
	condFailed = certv1.PodCertificateRequestConditionTypeFailed
)

func TestParseRequest(t *testing.T) {
	ecKey := p256(t)
	genEC := func(c elliptic.Curve) crypto.Signer {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// A CSR whose signature no longer matches its content.
	tampered := stubCSR(t, ecKey)
	tampered[len(tampered)-3] ^= 0xff

	tests := []struct {
		name       string
		edit       func(*certv1.PodCertificateRequestSpec)
		wantType   string
		wantReason string
		wantInMsg  string
		wantMax    time.Duration
		wantHint   string
	}{
		{name: "P-256 accepted", wantMax: 24 * time.Hour},
		{name: "P-384 accepted", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = stubCSR(t, genEC(elliptic.P384())) }, wantMax: 24 * time.Hour},
		{name: "P-521 unsupported", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = stubCSR(t, genEC(elliptic.P521())) },
			wantType: condDenied, wantReason: certv1.PodCertificateRequestConditionUnsupportedKeyType, wantInMsg: `keyType "ECDSAP256"`},
		{name: "Ed25519 unsupported", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = stubCSR(t, edKey) },
			wantType: condDenied, wantReason: certv1.PodCertificateRequestConditionUnsupportedKeyType, wantInMsg: "Ed25519"},
		{name: "RSA 2048 unsupported", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = stubCSR(t, rsa2048) },
			wantType: condDenied, wantReason: certv1.PodCertificateRequestConditionUnsupportedKeyType, wantInMsg: "RSA 2048-bit"},
		{name: "no stub CSR", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = nil },
			wantType: condDenied, wantReason: ReasonInvalidRequest, wantInMsg: "stubPKCS10Request is empty"},
		{name: "garbage CSR", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = []byte("not der") },
			wantType: condDenied, wantReason: ReasonInvalidRequest, wantInMsg: "not a PKCS#10"},
		{name: "bad proof of possession", edit: func(s *certv1.PodCertificateRequestSpec) { s.StubPKCS10Request = tampered },
			wantType: condDenied, wantReason: ReasonInvalidRequest, wantInMsg: "proves no key possession"},
		{name: "unknown annotation", edit: func(s *certv1.PodCertificateRequestSpec) {
			s.UnverifiedUserAnnotations = map[string]string{"example.com/x": "y"}
		}, wantType: condDenied, wantReason: certv1.PodCertificateRequestConditionInvalidUserConfig, wantInMsg: `"example.com/x"`},
		{name: "hint annotation", edit: func(s *certv1.PodCertificateRequestSpec) {
			s.UnverifiedUserAnnotations = map[string]string{HintAnnotation: "gold"}
		}, wantMax: 24 * time.Hour, wantHint: "gold"},
		{name: "max expiration honoured", edit: func(s *certv1.PodCertificateRequestSpec) { s.MaxExpirationSeconds = ptr.To[int32](7200) }, wantMax: 2 * time.Hour},
		{name: "max expiration defaulted", edit: func(s *certv1.PodCertificateRequestSpec) { s.MaxExpirationSeconds = nil }, wantMax: 24 * time.Hour},
		{name: "max expiration under API minimum", edit: func(s *certv1.PodCertificateRequestSpec) { s.MaxExpirationSeconds = ptr.To[int32](600) },
			wantType: condDenied, wantReason: ReasonInvalidRequest, wantInMsg: "maxExpirationSeconds is 600"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, ecKey)
			if tt.edit != nil {
				tt.edit(&w.pcr.Spec)
			}
			r, v := parseRequest(&w.pcr.Spec)
			checkVerdict(t, v, tt.wantType, tt.wantReason, tt.wantInMsg)
			if v != nil {
				return
			}
			if r.maxLifetime != tt.wantMax || r.hint != tt.wantHint || r.pub == nil {
				t.Fatalf("request = %+v, want max %s hint %q", r, tt.wantMax, tt.wantHint)
			}
		})
	}
}

func TestRSAKeysAccepted(t *testing.T) {
	if testing.Short() {
		t.Skip("RSA 3072/4096 key generation is slow")
	}
	for _, bits := range []int{3072, 4096} {
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			t.Fatal(err)
		}
		if v := checkKey(&k.PublicKey); v != nil {
			t.Errorf("RSA %d: %v", bits, v)
		}
	}
}

func checkVerdict(t *testing.T, v *verdict, wantType, wantReason, wantInMsg string) {
	t.Helper()
	if wantType == "" {
		if v != nil {
			t.Fatalf("verdict %v, want none", v)
		}
		return
	}
	if v == nil {
		t.Fatalf("no verdict, want %s %s", wantType, wantReason)
	}
	if v.Type != wantType || v.Reason != wantReason || !strings.Contains(v.Message, wantInMsg) {
		t.Fatalf("verdict %v, want %s (%s) with %q", v, wantType, wantReason, wantInMsg)
	}
}

func TestCheckObjects(t *testing.T) {
	key := p256(t)
	tests := []struct {
		name       string
		edit       func(*world) objects
		wantReason string
		wantInMsg  string
	}{
		{name: "all match", edit: func(w *world) objects { return objects{w.pod, w.node, w.sa} }},
		{name: "running pod", edit: func(w *world) objects { w.pod.Status.Phase = corev1.PodRunning; return objects{w.pod, w.node, w.sa} }},
		{name: "pod gone", edit: func(w *world) objects { return objects{nil, w.node, w.sa} },
			wantReason: ReasonPodMismatch, wantInMsg: "pod shop/web-0 no longer exists"},
		{name: "pod replaced", edit: func(w *world) objects { w.pod.UID = "other"; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonPodMismatch, wantInMsg: "the pod was replaced"},
		{name: "pod on another node", edit: func(w *world) objects { w.pod.Spec.NodeName = "n2"; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonPodMismatch, wantInMsg: `is on node "n2"`},
		{name: "pod runs as another service account", edit: func(w *world) objects { w.pod.Spec.ServiceAccountName = "db"; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonPodMismatch, wantInMsg: `service account "db"`},
		{name: "pod finished", edit: func(w *world) objects { w.pod.Status.Phase = corev1.PodSucceeded; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonPodMismatch, wantInMsg: "has finished"},
		{name: "mirror pod", edit: func(w *world) objects {
			w.pod.Annotations = map[string]string{mirrorPodAnnotation: "x"}
			return objects{w.pod, w.node, w.sa}
		}, wantReason: ReasonPodMismatch, wantInMsg: "static (mirror) pod"},
		{name: "pod mounts another signer", edit: func(w *world) objects {
			w.pod.Spec.Volumes[0].Projected.Sources[0].PodCertificate.SignerName = "example.com/other"
			return objects{w.pod, w.node, w.sa}
		}, wantReason: ReasonPodMismatch, wantInMsg: "no podCertificate projected volume with signerName " + cluster.SVIDSigner},
		{name: "node gone", edit: func(w *world) objects { return objects{w.pod, nil, w.sa} },
			wantReason: ReasonNodeMismatch, wantInMsg: "node n1 no longer exists"},
		{name: "node re-registered", edit: func(w *world) objects { w.node.UID = "new"; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonNodeMismatch, wantInMsg: "re-registered"},
		{name: "service account gone", edit: func(w *world) objects { return objects{w.pod, w.node, nil} },
			wantReason: ReasonServiceAccountMismatch, wantInMsg: "service account shop/web no longer exists"},
		{name: "service account re-created", edit: func(w *world) objects { w.sa.UID = "new"; return objects{w.pod, w.node, w.sa} },
			wantReason: ReasonServiceAccountMismatch, wantInMsg: "re-created"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, key)
			v := checkObjects(w.pcr, cluster.SVIDSigner, tt.edit(&w))
			if tt.wantReason == "" {
				checkVerdict(t, v, "", "", "")
				return
			}
			checkVerdict(t, v, condDenied, tt.wantReason, tt.wantInMsg)
		})
	}
}

func TestChooseIdentity(t *testing.T) {
	key := p256(t)
	set := testRules(t)
	tests := []struct {
		name       string
		edit       func(*corev1.Pod)
		hint       string
		wantID     string
		wantDNS    string
		wantReason string
		wantInMsg  string
	}{
		{name: "service account rule", wantID: "spiffe://example.org/ns/shop/sa/web", wantDNS: "web-0.svc"},
		{name: "first of several without hint", edit: func(p *corev1.Pod) { p.Labels["tier"] = "gold" }, wantID: "spiffe://example.org/ns/shop/sa/web"},
		{name: "hint picks the second", edit: func(p *corev1.Pod) { p.Labels["tier"] = "gold" }, hint: "gold", wantID: "spiffe://example.org/gold/web-0"},
		{name: "hint names no SVID of the pod", hint: "gold",
			wantReason: certv1.PodCertificateRequestConditionInvalidUserConfig, wantInMsg: `no SVID with hint "gold"`},
		{name: "no rule matches", edit: func(p *corev1.Pod) { p.Spec.ServiceAccountName = "other" },
			wantReason: ReasonNoMatchingRule, wantInMsg: "no SVID rule of trust domain example.org matches who"},
		{name: "rule on a container field never matches", edit: func(p *corev1.Pod) { p.Spec.ServiceAccountName = "db" },
			wantReason: ReasonNoMatchingRule, wantInMsg: "container fields never match"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, key)
			if tt.edit != nil {
				tt.edit(w.pod)
			}
			attrs, err := k8sattestor.PodAttributes(w.pod)
			if err != nil {
				t.Fatal(err)
			}
			id, v := chooseIdentity(set, testTD, attrs, tt.hint, "who")
			if tt.wantReason != "" {
				checkVerdict(t, v, condDenied, tt.wantReason, tt.wantInMsg)
				return
			}
			checkVerdict(t, v, "", "", "")
			if id.ID.String() != tt.wantID {
				t.Fatalf("id %s, want %s", id.ID, tt.wantID)
			}
			if tt.wantDNS != "" && (len(id.DNSNames) != 1 || id.DNSNames[0] != tt.wantDNS) {
				t.Fatalf("dns %v, want %s", id.DNSNames, tt.wantDNS)
			}
		})
	}
}

func TestTTLFor(t *testing.T) {
	tests := []struct {
		name            string
		maxLife, maxTTL time.Duration
		want            time.Duration
		wantFailed      bool
	}{
		{name: "request bound only", maxLife: 48 * time.Hour, want: 48 * time.Hour},
		{name: "our cap is lower", maxLife: 48 * time.Hour, maxTTL: 24 * time.Hour, want: 24 * time.Hour},
		{name: "request is lower", maxLife: 2 * time.Hour, maxTTL: 24 * time.Hour, want: 2 * time.Hour},
		{name: "exactly the minimum", maxLife: time.Hour, maxTTL: 24 * time.Hour, want: time.Hour},
		{name: "cap under the minimum", maxLife: 24 * time.Hour, maxTTL: 30 * time.Minute, wantFailed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, v := ttlFor(tt.maxLife, tt.maxTTL)
			if tt.wantFailed {
				checkVerdict(t, v, condFailed, ReasonLifetime, "maxTTL")
				return
			}
			if v != nil || got != tt.want {
				t.Fatalf("ttl %s, %v; want %s", got, v, tt.want)
			}
		})
	}
}

func TestCheckChain(t *testing.T) {
	key, other := p256(t), p256(t)
	id := testTD.ID()
	good := func(ca *testCA, ttl time.Duration) []*x509.Certificate {
		chain, err := ca.SignSVID(t.Context(), key.Public(), id, nil, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return chain
	}
	ca := newTestCA(t, 365*24*time.Hour)
	dying := newTestCA(t, 30*time.Minute)
	long := newTestCA(t, 365*24*time.Hour)
	long.extra = time.Minute
	otherKey, _ := ca.SignSVID(t.Context(), other.Public(), id, nil, 2*time.Hour)
	wrongID, _ := ca.SignSVID(t.Context(), key.Public(), mustID(t, "/x"), nil, 2*time.Hour)

	tests := []struct {
		name       string
		chain      []*x509.Certificate
		wantReason string
		wantInMsg  string
	}{
		{name: "good", chain: good(ca, 2*time.Hour)},
		{name: "empty", chain: nil, wantReason: ReasonSigningFailed, wantInMsg: "no certificate"},
		{name: "another key", chain: otherKey, wantReason: ReasonSigningFailed, wantInMsg: "another key"},
		{name: "another ID", chain: wrongID, wantReason: ReasonSigningFailed, wantInMsg: "URI SANs"},
		{name: "root expires too soon", chain: good(dying, 2*time.Hour), wantReason: ReasonLifetime, wantInMsg: "rotate the root"},
		{name: "longer than allowed", chain: good(long, 2*time.Hour), wantReason: ReasonSigningFailed, wantInMsg: "longer than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := checkChain(tt.chain, key.Public(), id, 2*time.Hour)
			if tt.wantReason == "" {
				checkVerdict(t, v, "", "", "")
				return
			}
			checkVerdict(t, v, condFailed, tt.wantReason, tt.wantInMsg)
		})
	}
}

func TestRefreshAt(t *testing.T) {
	nb := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name     string
		life     time.Duration
		fraction float64
		want     time.Duration // after nb
	}{
		{name: "half of a day", life: 24 * time.Hour, fraction: 0.5, want: 12 * time.Hour},
		{name: "half of the minimum", life: time.Hour, fraction: 0.5, want: 30 * time.Minute},
		{name: "odd second truncated", life: time.Hour + time.Second, fraction: 0.5, want: 30 * time.Minute},
		{name: "early fraction kept 10m after notBefore", life: time.Hour, fraction: 0.01, want: 10 * time.Minute},
		{name: "late fraction kept 10m before notAfter", life: time.Hour, fraction: 0.99, want: 50 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := refreshAt(nb, nb.Add(tt.life), tt.fraction)
			if want := nb.Add(tt.want); !got.Equal(want) {
				t.Fatalf("refreshAt = %s, want %s", got, want)
			}
		})
	}
}

// FuzzParseRequest: the spec is written by whoever may create requests.
func FuzzParseRequest(f *testing.F) {
	f.Add(stubCSR(f, p256(f)), "", "", int32(3600))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00}, HintAnnotation, "x", int32(0))
	f.Add([]byte("garbage"), "example.com/k", "v", int32(-1))
	f.Fuzz(func(t *testing.T, der []byte, annKey, annValue string, maxExp int32) {
		spec := certv1.PodCertificateRequestSpec{StubPKCS10Request: der, MaxExpirationSeconds: &maxExp}
		if annKey != "" {
			spec.UnverifiedUserAnnotations = map[string]string{annKey: annValue}
		}
		r, v := parseRequest(&spec)
		if v == nil {
			if r.pub == nil || r.maxLifetime < MinLifetime || checkKey(r.pub) != nil {
				t.Fatalf("accepted %+v", r)
			}
			return
		}
		if v.Type != condDenied || v.Reason == "" || v.Message == "" {
			t.Fatalf("verdict %+v", v)
		}
	})
}
