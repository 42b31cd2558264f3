package cluster

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	certsv1 "k8s.io/api/certificates/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

// Cases run in this order (one cluster); each waits for what it needs
// first, so -run can pick any of them.

// Both agents hold a node intermediate issued through the CSR API: a CA for
// its node ID only, capped at the controller's TTL, signed by a published
// root, and requested as the agent's service account on that node.
func TestAgentsObtainIntermediates(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 3*time.Minute)
	for _, node := range nodes {
		t.Run(node, func(t *testing.T) {
			a := e.agents[node]
			if err := e.waitAgentReady(ctx, a); err != nil {
				t.Fatal(err)
			}
			svid, bundle := fetchX509(ctx, t, a)
			if svid.ID != wantID(t) {
				t.Errorf("SVID %s, want %s", svid.ID, wantID(t))
			}
			inter := intermediate(t, svid)
			uris := make([]string, 0, len(inter.URIs))
			for _, u := range inter.URIs {
				uris = append(uris, u.String())
			}
			if !inter.IsCA || inter.MaxPathLen != 0 || !inter.MaxPathLenZero {
				t.Errorf("intermediate: IsCA %v MaxPathLen %d zero %v, want a CA with path length 0", inter.IsCA, inter.MaxPathLen, inter.MaxPathLenZero)
			}
			if want := []string{nodeURI(t, node)}; !slices.Equal(uris, want) {
				t.Errorf("intermediate URI SANs %v, want %v", uris, want)
			}
			if !slices.Equal(inter.PermittedURIDomains, []string{trustDomain}) {
				t.Errorf("intermediate permitted URI domains %v, want [%s]", inter.PermittedURIDomains, trustDomain)
			}
			if inter.KeyUsage&x509.KeyUsageCertSign == 0 {
				t.Errorf("intermediate key usage %b lacks cert sign", inter.KeyUsage)
			}
			if max := time.Now().Add(intermediateTTL + 10*time.Second); inter.NotAfter.After(max) {
				t.Errorf("intermediate expires %s, after the controller's cap (%s from now)", inter.NotAfter, intermediateTTL)
			}
			roots, _, err := trustBundle(ctx, suite.cp.Client)
			if err != nil {
				t.Fatalf("ClusterTrustBundle: %v", err)
			}
			if signedBy(inter, roots) < 0 {
				t.Errorf("intermediate not signed by any of the %d ClusterTrustBundle roots", len(roots))
			}
			if got := bundle.X509Authorities(); !sameCerts(got, roots) {
				t.Errorf("agent serves %d X.509 authorities, the ClusterTrustBundle has %d, not the same", len(got), len(roots))
			}
			// The API server recorded who asked, from the node-bound token.
			csrs, err := suite.cp.Client.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for i := range csrs.Items {
				c := &csrs.Items[i]
				if c.Spec.SignerName != cluster.IntermediateSigner || condition(c, certsv1.CertificateApproved) == nil {
					continue
				}
				if slices.Equal(c.Spec.Extra[cluster.NodeNameExtra], []string{node}) {
					found = true
					if want := "system:serviceaccount:" + namespace + ":" + agentSA; c.Spec.Username != want {
						t.Errorf("CSR %s by %q, want %q", c.Name, c.Spec.Username, want)
					}
					if r := condition(c, certsv1.CertificateApproved).Reason; r != cluster.ReasonApproved {
						t.Errorf("CSR %s approved with reason %q, want %q", c.Name, r, cluster.ReasonApproved)
					}
				}
			}
			if !found {
				t.Errorf("no approved %s CSR from node %s", cluster.IntermediateSigner, node)
			}
		})
	}
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for _, c := range a {
		if !slices.ContainsFunc(b, c.Equal) {
			return false
		}
	}
	return true
}

// An X.509-SVID from one node verifies against the bundle another node
// serves: one trust domain, two node intermediates.
func TestX509SVIDVerifiesAcrossNodes(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, time.Minute)
	for _, tc := range []struct{ from, to string }{{"node-a", "node-b"}, {"node-b", "node-a"}} {
		t.Run(tc.from+" to "+tc.to, func(t *testing.T) {
			svid, _ := fetchX509(ctx, t, e.agents[tc.from])
			other, bundle := fetchX509(ctx, t, e.agents[tc.to])
			if intermediate(t, svid).Equal(intermediate(t, other)) {
				t.Fatalf("%s and %s serve the same intermediate", tc.from, tc.to)
			}
			if err := verifiesAgainst(svid, bundle); err != nil {
				t.Errorf("SVID from %s does not verify against %s's bundle: %v", tc.from, tc.to, err)
			}
		})
	}
}

// A JWT-SVID from one node, signed with that node's key as published in the
// JWKS ConfigMap, validates on another node.
func TestJWTSVIDValidatesAcrossNodes(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, time.Minute)
	const audience = "cluster-test"
	for _, tc := range []struct{ from, to string }{{"node-a", "node-b"}, {"node-b", "node-a"}} {
		t.Run(tc.from+" to "+tc.to, func(t *testing.T) {
			svid := fetchJWT(ctx, t, e.agents[tc.from], audience)
			kid, err := keyID(svid.Marshal())
			if err != nil {
				t.Fatal(err)
			}
			keys, err := jwks(ctx, suite.cp.Client)
			if err != nil {
				t.Fatalf("JWKS ConfigMap: %v", err)
			}
			if !slices.Contains(keysOf(keys, tc.from), kid) {
				t.Errorf("JWT-SVID from %s signed with kid %s, not one of its keys in the JWKS %v", tc.from, kid, keysOf(keys, tc.from))
			}
			var got *jwtsvid.SVID
			// The other agent's JWKS watch may lag the ConfigMap by moments.
			err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
				got, err = workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), audience, workloadapi.WithAddr(e.agents[tc.to].Addr()))
				return err == nil, nil
			})
			if err != nil {
				t.Fatalf("ValidateJWTSVID on %s: %v", tc.to, err)
			}
			if got.ID != wantID(t) {
				t.Errorf("validated as %s, want %s", got.ID, wantID(t))
			}
			if _, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), "another-audience", workloadapi.WithAddr(e.agents[tc.to].Addr())); err == nil {
				t.Errorf("ValidateJWTSVID on %s accepted the token for another audience", tc.to)
			}
		})
	}
}

// keyID is the kid in a JWT's header.
func keyID(token string) (string, error) {
	head, _, ok := strings.Cut(token, ".")
	if !ok {
		return "", fmt.Errorf("not a JWT")
	}
	b, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return "", err
	}
	var h struct {
		Kid string `json:"kid"`
	}
	return h.Kid, json.Unmarshal(b, &h)
}

// The controller approves exactly what the contract allows: the agent's
// service account, for the node its token is bound to, with the node ID as
// the only SAN and the allowed usages and keys. Everything else is denied,
// with the reason agents and people look for.
func TestControllerDecidesCSRs(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 2*time.Minute)
	// An impostor: another service account, allowed to create CSRs, with a
	// token bound to node-a.
	const impostor = "impostor"
	rbac := suite.cp.Client.RbacV1()
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "cluster-test-csr-creator"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"certificatesigningrequests"}, Verbs: []string{"create", "get"}}}}
	if _, err := rbac.ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: impostor, Namespace: namespace}}}
	if _, err := rbac.ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = rbac.ClusterRoleBindings().Delete(context.Background(), binding.Name, metav1.DeleteOptions{})
		_ = rbac.ClusterRoles().Delete(context.Background(), role.Name, metav1.DeleteOptions{})
	})
	dir := t.TempDir()
	impostorKC, unboundKC := dir+"/impostor.kubeconfig", dir+"/unbound.kubeconfig"
	if err := suite.cp.ServiceAccountKubeconfig(ctx, namespace, impostor, "node-a", impostorKC); err != nil {
		t.Fatal(err)
	}
	if err := suite.cp.ServiceAccountKubeconfig(ctx, namespace, agentSA, "", unboundKC); err != nil {
		t.Fatal(err)
	}
	agentA := clientFor(t, e.agents["node-a"].kubeconfig)
	clients := map[string]string{"agent on node-a": e.agents["node-a"].kubeconfig, "impostor on node-a": impostorKC, "agent, token bound to no node": unboundKC}
	intermediateUsages := []certsv1.KeyUsage{certsv1.UsageCertSign, certsv1.UsageCRLSign}
	jwtUsages := []certsv1.KeyUsage{certsv1.UsageDigitalSignature}
	for _, tc := range []struct {
		name    string
		as      string
		spec    csrSpec
		approve bool
	}{
		{"intermediate for its own node", "agent on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: intermediateUsages}, true},
		{"JWT key for its own node", "agent on node-a", csrSpec{signer: cluster.JWTKeySigner, uris: []string{nodeURI(t, "node-a")}, usages: jwtUsages}, true},
		{"agent claiming another node", "agent on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-b")}, usages: intermediateUsages}, false},
		{"JWT key for another node", "agent on node-a", csrSpec{signer: cluster.JWTKeySigner, uris: []string{nodeURI(t, "node-b")}, usages: jwtUsages}, false},
		{"another service account", "impostor on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: intermediateUsages}, false},
		{"token bound to no node", "agent, token bound to no node", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: intermediateUsages}, false},
		{"a DNS SAN besides the node ID", "agent on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, dns: []string{"node-a"}, usages: intermediateUsages}, false},
		{"server auth usage", "agent on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: []certsv1.KeyUsage{certsv1.UsageCertSign, certsv1.UsageServerAuth}}, false},
		{"RSA 1024 key", "agent on node-a", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: intermediateUsages, key: "rsa1024"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := agentA
			if kc := clients[tc.as]; kc != e.agents["node-a"].kubeconfig {
				cs = clientFor(t, kc)
			}
			got := submitCSR(ctx, t, cs, tc.spec)
			approved, denied := condition(got, certsv1.CertificateApproved), condition(got, certsv1.CertificateDenied)
			switch {
			case tc.approve && approved == nil:
				t.Fatalf("not approved: %+v", got.Status.Conditions)
			case tc.approve:
				if approved.Reason != cluster.ReasonApproved {
					t.Errorf("approved with reason %q, want %q", approved.Reason, cluster.ReasonApproved)
				}
				certs, err := parsePEMCerts(got.Status.Certificate)
				if err != nil || len(certs) != 1 {
					t.Fatalf("status.certificate: %d certificates, %v; want exactly one", len(certs), err)
				}
				if want := tc.spec.signer == cluster.IntermediateSigner; certs[0].IsCA != want {
					t.Errorf("issued certificate IsCA %v, want %v", certs[0].IsCA, want)
				}
				if len(certs[0].URIs) != 1 || certs[0].URIs[0].String() != tc.spec.uris[0] {
					t.Errorf("issued certificate URIs %v, want [%s]", certs[0].URIs, tc.spec.uris[0])
				}
			case denied == nil:
				t.Fatalf("not denied: %+v", got.Status.Conditions)
			default:
				if denied.Reason != cluster.ReasonDenied || denied.Message == "" {
					t.Errorf("denied with reason %q, message %q; want reason %q and a message", denied.Reason, denied.Message, cluster.ReasonDenied)
				}
				if len(got.Status.Certificate) != 0 {
					t.Errorf("denied CSR carries a certificate")
				}
				t.Logf("denied: %s", denied.Message)
			}
		})
	}
}

// Killing the leader hands over to the other replica, which keeps the root:
// the same ClusterTrustBundle, the same Secret, and new CSRs still signed by it.
func TestLeaderFailoverKeepsTheRoot(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 2*time.Minute)
	var holder string
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		h, err := leader(ctx, suite.cp.Client)
		holder = h
		return err == nil && h != "", nil
	}); err != nil {
		t.Fatalf("no controller holds lease %s: %v", cluster.Lease, err)
	}
	var killed, other *controller
	for _, c := range e.controllers {
		if c.identity == holder {
			killed = c
		} else {
			other = c
		}
	}
	if killed == nil || other == nil {
		t.Fatalf("lease held by %q, not one of the replicas", holder)
	}
	_, ctbBefore, err := trustBundle(ctx, suite.cp.Client)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := suite.cp.Client.CoreV1().Secrets(namespace).Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := suite.cp.StopProcess(killed.proc(), 0); err != nil { // SIGKILL: the lease is not released
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.startController(killed); err != nil {
			t.Errorf("restart %s: %v", killed.identity, err)
			return
		}
		if err := e.waitReady(context.Background(), killed.proc(), killed.metrics, time.Minute); err != nil {
			t.Error(err)
		}
	})
	t0 := time.Now()
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 45*time.Second, true, func(ctx context.Context) (bool, error) {
		h, err := leader(ctx, suite.cp.Client)
		return err == nil && h == other.identity, nil
	}); err != nil {
		t.Fatalf("%s did not take the lease after %s was killed: %v", other.identity, killed.identity, err)
	}
	t.Logf("%s took over %.1fs after %s was killed", other.identity, time.Since(t0).Seconds(), killed.identity)
	got := submitCSR(ctx, t, clientFor(t, e.agents["node-a"].kubeconfig),
		csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: []certsv1.KeyUsage{certsv1.UsageCertSign}})
	if condition(got, certsv1.CertificateApproved) == nil {
		t.Fatalf("new leader did not approve a valid CSR: %+v", got.Status.Conditions)
	}
	roots, ctbAfter, err := trustBundle(ctx, suite.cp.Client)
	if err != nil {
		t.Fatal(err)
	}
	if ctbAfter != ctbBefore {
		t.Errorf("ClusterTrustBundle changed on failover:\nbefore %s\nafter %s", ctbBefore, ctbAfter)
	}
	after, err := suite.cp.Client.CoreV1().Secrets(namespace).Get(ctx, cluster.RootSecret, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if string(after.Data["tls.crt"]) != string(secret.Data["tls.crt"]) {
		t.Errorf("root Secret's tls.crt changed on failover")
	}
	certs, err := parsePEMCerts(got.Status.Certificate)
	if err != nil || len(certs) == 0 {
		t.Fatalf("status.certificate: %v", err)
	}
	if signedBy(certs[0], roots) < 0 {
		t.Errorf("certificate from the new leader is not signed by a root of the unchanged bundle")
	}
	if ok, msg := ready(ctx, other.metrics); !ok {
		t.Errorf("new leader not ready: %s", msg)
	}
}

// With kube-apiserver stopped the agents keep minting and serving
// X.509-SVIDs on the intermediate they hold, on new connections and on the
// streams open before; once it is back the cluster works as before.
func TestAPIServerOutageKeepsServing(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 4*time.Minute)
	for _, node := range nodes {
		if err := e.waitAgentReady(ctx, e.agents[node]); err != nil {
			t.Fatal(err)
		}
	}
	watches := openStreams(ctx, t, e)
	if err := suite.cp.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	// What each agent serves once the API server is gone.
	atStop := map[string]*x509svid.SVID{}
	for _, node := range nodes {
		atStop[node], _ = fetchX509(ctx, t, e.agents[node])
	}
	restarted := false
	restart := func() {
		if restarted {
			return
		}
		restarted = true
		if err := suite.cp.StartAPIServer(context.Background()); err != nil {
			t.Fatalf("restart kube-apiserver: %v", err)
		}
		t.Logf("kube-apiserver down for %.1fs", time.Since(down).Seconds())
	}
	t.Cleanup(restart)
	for _, node := range nodes {
		t.Run("serves during the outage/"+node, func(t *testing.T) {
			a := e.agents[node]
			// A new SVID minted while the API server is down, on a new connection.
			err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 40*time.Second, true, func(ctx context.Context) (bool, error) {
				s, b := fetchX509(ctx, t, a)
				if err := verifiesAgainst(s, b); err != nil {
					return false, fmt.Errorf("SVID served during the outage does not verify: %w", err)
				}
				return s.Certificates[0].SerialNumber.Cmp(atStop[node].Certificates[0].SerialNumber) != 0, nil
			})
			if err != nil {
				t.Fatalf("no new X.509-SVID during the outage: %v", err)
			}
		})
	}
	// The streams open before the outage got the new SVIDs too.
	waitStreams(ctx, t, watches, "new SVID during the outage", 20*time.Second, func(node string, xc *workloadapi.X509Context) bool {
		return xc.DefaultSVID().Certificates[0].SerialNumber.Cmp(atStop[node].Certificates[0].SerialNumber) != 0
	})
	for _, node := range nodes {
		if _, errs := watches[node].snapshot(); len(errs) > 0 {
			t.Errorf("stream on %s during the outage: %v", node, errs)
		}
	}
	restart()
	// Back: the controller decides again, the agents are ready and trust
	// each other's JWT keys.
	got := submitCSR(ctx, t, clientFor(t, e.agents["node-a"].kubeconfig),
		csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: []certsv1.KeyUsage{certsv1.UsageCertSign}})
	if condition(got, certsv1.CertificateApproved) == nil {
		t.Errorf("valid CSR after the outage not approved: %+v", got.Status.Conditions)
	}
	for _, node := range nodes {
		if err := e.waitAgentReady(ctx, e.agents[node]); err != nil {
			t.Error(err)
		}
	}
	svid := fetchJWT(ctx, t, e.agents["node-a"], "after-outage")
	if _, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), "after-outage", workloadapi.WithAddr(e.agents["node-b"].Addr())); err != nil {
		t.Errorf("node-b rejects node-a's JWT-SVID after the outage: %v", err)
	}
}

// streamWatch is one open go-spiffe X.509 stream, checked at every update.
type streamWatch struct {
	ctx     context.Context
	node    string
	mu      sync.Mutex
	updates int
	errs    []string // stream errors and updates that did not verify
	last    *workloadapi.X509Context
}

func (w *streamWatch) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.updates++
	b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
	if err == nil {
		err = verifiesAgainst(xc.DefaultSVID(), b)
	}
	if err != nil {
		w.errs = append(w.errs, fmt.Sprintf("update %d: %v", w.updates, err))
	}
	w.last = xc
}

func (w *streamWatch) OnX509ContextWatchError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ctx.Err() == nil { // not the test ending the watch
		w.errs = append(w.errs, "stream error: "+err.Error())
	}
}

func (w *streamWatch) snapshot() (*workloadapi.X509Context, []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last, slices.Clone(w.errs)
}

// openStreams opens one go-spiffe X.509 stream per node, closed when the
// test ends, and waits for the first update of each.
func openStreams(ctx context.Context, t *testing.T, e *env) map[string]*streamWatch {
	t.Helper()
	watchCtx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() { stopWatch(); wg.Wait() })
	watches := map[string]*streamWatch{}
	for _, node := range nodes {
		c, err := workloadapi.New(watchCtx, workloadapi.WithAddr(e.agents[node].Addr()))
		if err != nil {
			t.Fatal(err)
		}
		w := &streamWatch{ctx: watchCtx, node: node}
		watches[node] = w
		wg.Add(1)
		go func() { defer wg.Done(); defer c.Close(); _ = c.WatchX509Context(watchCtx, w) }()
	}
	waitStreams(ctx, t, watches, "first update", 30*time.Second, func(string, *workloadapi.X509Context) bool { return true })
	return watches
}

// waitStreams waits until ok holds for every stream's last update.
func waitStreams(ctx context.Context, t *testing.T, watches map[string]*streamWatch, what string, d time.Duration, ok func(node string, xc *workloadapi.X509Context) bool) {
	t.Helper()
	for _, node := range nodes {
		err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, d, true, func(context.Context) (bool, error) {
			xc, _ := watches[node].snapshot()
			return xc != nil && ok(node, xc), nil
		})
		if err != nil {
			t.Fatalf("%s: stream on %s: %v", what, node, err)
		}
	}
}

// A root rotation (the Secret's rotate annotation) keeps every open stream
// trusting: the next root reaches the streams before it signs, and the SVID
// on an intermediate from the new root verifies against the bundle each
// stream holds, its own node's and the other's.
func TestRootRotationKeepsStreamsTrusting(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 5*time.Minute)
	rootsBefore, _, err := trustBundle(ctx, suite.cp.Client)
	if err != nil {
		t.Fatal(err)
	}
	watches := openStreams(ctx, t, e)
	waitWatch := func(what string, d time.Duration, ok func(node string, xc *workloadapi.X509Context) bool) {
		t.Helper()
		waitStreams(ctx, t, watches, what, d, ok)
	}

	patch := fmt.Sprintf(`{"metadata":{"annotations":{"csi-agent.spiffe.io/rotate":%q}}}`, time.Now().UTC().Format(time.RFC3339))
	if _, err := suite.cp.Client.CoreV1().Secrets(namespace).Patch(ctx, cluster.RootSecret, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	asked := time.Now()
	var next *x509.Certificate
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		roots, _, err := trustBundle(ctx, suite.cp.Client)
		if err != nil {
			return false, nil
		}
		for _, r := range roots {
			if !slices.ContainsFunc(rootsBefore, r.Equal) {
				next = r
			}
		}
		return next != nil, nil
	}); err != nil {
		t.Fatalf("no new root in the ClusterTrustBundle after the rotate annotation: %v", err)
	}
	t.Logf("next root published %.1fs after the annotation", time.Since(asked).Seconds())
	// The controller takes the annotation away once it acted on it.
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
		s, err := suite.cp.Client.CoreV1().Secrets(namespace).Get(ctx, cluster.RootSecret, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		_, still := s.Annotations["csi-agent.spiffe.io/rotate"]
		return !still, nil
	}); err != nil {
		t.Errorf("the rotate annotation is still on the Secret: %v", err)
	}
	hasRoot := func(xc *workloadapi.X509Context, r *x509.Certificate) bool {
		b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
		return err == nil && slices.ContainsFunc(b.X509Authorities(), r.Equal)
	}
	waitWatch("next root in the stream's bundle", 30*time.Second, func(_ string, xc *workloadapi.X509Context) bool { return hasRoot(xc, next) })
	// After the activation delay the controller signs with the next root.
	var probe *x509.Certificate
	if err := wait.PollUntilContextTimeout(ctx, time.Second, rootActivationDelay+45*time.Second, true, func(ctx context.Context) (bool, error) {
		got := submitCSR(ctx, t, clientFor(t, e.agents["node-a"].kubeconfig),
			csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, "node-a")}, usages: []certsv1.KeyUsage{certsv1.UsageCertSign}})
		certs, err := parsePEMCerts(got.Status.Certificate)
		if err != nil || len(certs) != 1 {
			return false, nil
		}
		probe = certs[0]
		return probe.CheckSignatureFrom(next) == nil, nil
	}); err != nil {
		t.Fatalf("the controller does not sign with the next root %s after the annotation: %v", time.Since(asked), err)
	}
	t.Logf("next root signs %.1fs after the annotation", time.Since(asked).Seconds())
	// An agent that starts now gets its intermediate from the next root; the
	// SVIDs it mints must verify against what the open streams hold.
	const fresh = "node-c"
	c, err := e.addAgent(ctx, fresh, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.removeAgent(c) })
	if err := e.waitAgentReady(ctx, c); err != nil {
		t.Fatal(err)
	}
	freshSVID, freshBundle := fetchX509(ctx, t, c)
	if intermediate(t, freshSVID).CheckSignatureFrom(next) != nil {
		t.Fatalf("%s's intermediate is not from the next root", fresh)
	}
	for _, node := range nodes {
		xc, errs := watches[node].snapshot()
		b, err := xc.Bundles.GetX509BundleForTrustDomain(td)
		if err != nil {
			t.Fatal(err)
		}
		if err := verifiesAgainst(freshSVID, b); err != nil {
			t.Errorf("SVID minted on the next root does not verify against the bundle the stream on %s holds: %v", node, err)
		}
		if err := verifiesAgainst(xc.DefaultSVID(), freshBundle); err != nil {
			t.Errorf("SVID on %s's stream (intermediate from the old root) does not verify on %s: %v", node, fresh, err)
		}
		for _, e := range errs {
			t.Errorf("stream on %s: %s", node, e)
		}
	}
	// The old root stays while intermediates it signed may live.
	roots, _, err := trustBundle(ctx, suite.cp.Client)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rootsBefore {
		if !slices.ContainsFunc(roots, r.Equal) {
			t.Errorf("a root of before the rotation left the ClusterTrustBundle while intermediates it signed live")
		}
	}
}

// Deleting a Node ends its agent's part in the trust domain: its JWT key
// leaves the JWKS at once (and the other agents stop accepting its
// JWT-SVIDs), and the controller certifies nothing more for it, although
// the agent's pod-bound token still authenticates.
func TestNodeDeletionStopsRenewal(t *testing.T) {
	e := needAgents(t)
	ctx := timeout(t, 3*time.Minute)
	const node = "node-gone"
	a, err := e.addAgent(ctx, node, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.removeAgent(a) })
	if err := e.waitAgentReady(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		keys, err := jwks(ctx, suite.cp.Client)
		return err == nil && len(keysOf(keys, node)) > 0, nil
	}); err != nil {
		t.Fatalf("no JWT key of %s in the JWKS: %v", node, err)
	}
	const audience = "node-deletion"
	jwt := fetchJWT(ctx, t, a, audience)
	nodeA := e.agents["node-a"].Addr()
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), audience, workloadapi.WithAddr(nodeA))
		return err == nil, nil
	}); err != nil {
		t.Fatalf("node-a does not accept %s's JWT-SVID before the deletion: %v", node, err)
	}

	// What the agent asked for before the deletion was approved.
	before := map[string]bool{}
	csrs, err := suite.cp.Client.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range csrs.Items {
		before[c.Name] = true
	}
	if err := suite.cp.Client.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
		keys, err := jwks(ctx, suite.cp.Client)
		return err == nil && len(keysOf(keys, node)) == 0 && len(keysOf(keys, "node-a")) > 0, nil
	}); err != nil {
		keys, _ := jwks(ctx, suite.cp.Client)
		t.Fatalf("JWKS still holds %s's keys %v (or lost node-a's) after the Node was deleted: %v", node, keysOf(keys, node), err)
	}
	t.Logf("JWT key removed %.1fs after the Node was deleted", time.Since(deleted).Seconds())
	if err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 15*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := workloadapi.ValidateJWTSVID(ctx, jwt.Marshal(), audience, workloadapi.WithAddr(nodeA))
		return err != nil, nil
	}); err != nil {
		t.Errorf("node-a still accepts the JWT-SVID of deleted node %s", node)
	}

	// Renewal: whatever the agent asks now is denied.
	agentClient := clientFor(t, a.kubeconfig)
	for _, tc := range []struct {
		name string
		spec csrSpec
	}{
		{"intermediate", csrSpec{signer: cluster.IntermediateSigner, uris: []string{nodeURI(t, node)}, usages: []certsv1.KeyUsage{certsv1.UsageCertSign, certsv1.UsageCRLSign}}},
		{"JWT key", csrSpec{signer: cluster.JWTKeySigner, uris: []string{nodeURI(t, node)}, usages: []certsv1.KeyUsage{certsv1.UsageDigitalSignature}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := submitCSR(ctx, t, agentClient, tc.spec)
			denied := condition(got, certsv1.CertificateDenied)
			if denied == nil || denied.Reason != cluster.ReasonDenied {
				t.Fatalf("%s CSR for the deleted node: %+v, want Denied with reason %s", tc.name, got.Status.Conditions, cluster.ReasonDenied)
			}
			if !slices.Equal(got.Spec.Extra[cluster.NodeNameExtra], []string{node}) {
				t.Errorf("CSR recorded node %v, want %s (the pod-bound token)", got.Spec.Extra[cluster.NodeNameExtra], node)
			}
			t.Logf("denied: %s", denied.Message)
		})
	}
	csrs, err = suite.cp.Client.CertificatesV1().CertificateSigningRequests().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range csrs.Items {
		c := &csrs.Items[i]
		if slices.Equal(c.Spec.Extra[cluster.NodeNameExtra], []string{node}) && !before[c.Name] && condition(c, certsv1.CertificateApproved) != nil {
			t.Errorf("CSR %s (%s) for the deleted node was approved", c.Name, c.Spec.SignerName)
		}
	}
}
