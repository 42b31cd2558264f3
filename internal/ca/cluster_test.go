package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/internal/cluster"
)

const testNode = "node-a"

// fakeCluster is the controller's side of both seams: it signs what the
// node asks for with its root and publishes what the test tells it to.
type fakeCluster struct {
	t     testing.TB
	clock *clocktesting.FakeClock
	root  *signingCA

	mu        sync.Mutex
	down      bool // the API server is unreachable
	inters    []*x509.Certificate
	receipts  []*x509.Certificate
	trust     Trust
	published bool // trust was listed once
	changed   chan struct{}
	// manualJWKS: registered JWT keys wait for publishKey; otherwise
	// they are published at once, as the controller does.
	manualJWKS bool
}

func newFakeCluster(t testing.TB, fc *clocktesting.FakeClock) *fakeCluster {
	t.Helper()
	root, err := newRoot(testTD, fc.Now())
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeCluster{t: t, clock: fc, root: root, changed: make(chan struct{})}
	f.publish(func(tr *Trust) { tr.Roots = []*x509.Certificate{root.cert} })
	return f
}

func (f *fakeCluster) setDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
}

// publish changes the published trust and tells the watchers.
func (f *fakeCluster) publish(mod func(*Trust)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	mod(&f.trust)
	f.published = true
	close(f.changed)
	f.changed = make(chan struct{})
}

// publishKey adds a receipted key to the JWKS, as the controller does.
func (f *fakeCluster) publishKey(receipt *x509.Certificate) string {
	kid, err := cluster.KeyID(receipt.PublicKey)
	if err != nil {
		f.t.Fatal(err)
	}
	f.publish(func(tr *Trust) {
		tr.JWTKeys = append(tr.JWTKeys, cluster.JWTKey{Node: testNode, KeyID: kid, Public: receipt.PublicKey, NotAfter: receipt.NotAfter})
	})
	return kid
}

func (f *fakeCluster) Trust() (Trust, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.trust, f.published
}

func (f *fakeCluster) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changed
}

func (f *fakeCluster) SignIntermediate(ctx context.Context, csrDER []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	c, err := f.sign(ctx, csrDER, ttl, true)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.inters = append(f.inters, c)
	f.mu.Unlock()
	return []*x509.Certificate{c}, nil
}

func (f *fakeCluster) RegisterJWTKey(ctx context.Context, csrDER []byte, ttl time.Duration) (*x509.Certificate, error) {
	c, err := f.sign(ctx, csrDER, ttl, false)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.receipts = append(f.receipts, c)
	manual := f.manualJWKS
	f.mu.Unlock()
	if !manual {
		f.publishKey(c)
	}
	return c, nil
}

// sign checks the request as the controller does and issues from the root.
func (f *fakeCluster) sign(_ context.Context, csrDER []byte, ttl time.Duration, isCA bool) (*x509.Certificate, error) {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	if down {
		return nil, errors.New("connection refused")
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	want, _ := cluster.NodeID(testTD, testNode)
	if len(csr.URIs) != 1 || csr.URIs[0].String() != want.String() || len(csr.DNSNames)+len(csr.EmailAddresses)+len(csr.IPAddresses) != 0 {
		return nil, errors.New("denied: the request must name exactly " + want.String())
	}
	now := f.clock.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		Subject:      pkix.Name{CommonName: "node " + testNode},
		URIs:         []*url.URL{want.URL()},
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
		tmpl.BasicConstraintsValid, tmpl.IsCA, tmpl.MaxPathLenZero = true, true, true
		tmpl.PermittedURIDomains = []string{testTD.Name()}
	}
	f.mu.Lock()
	root := f.root
	f.mu.Unlock()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, csr.PublicKey, root.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (f *fakeCluster) counts() (inters, receipts int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.inters), len(f.receipts)
}

func (f *fakeCluster) lastReceipt() *x509.Certificate {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.receipts[len(f.receipts)-1]
}

func newClusterCA(t testing.TB, dir string, f *fakeCluster) *Authority {
	t.Helper()
	a, err := newCA(context.Background(), Options{
		TrustDomain: testTD, StateDir: dir, Clock: f.clock, IntermediateTTL: time.Hour, X509SVIDTTL: 10 * time.Minute,
		Cluster: &ClusterOptions{NodeName: testNode, Signer: f, Trust: f},
	})
	if err != nil {
		t.Fatalf("New (cluster): %v", err)
	}
	return a
}

// startCluster runs a cluster-mode authority until it is ready.
func startCluster(t *testing.T) (*fakeCluster, *Authority) {
	t.Helper()
	f := newFakeCluster(t, newFakeClock())
	a := newClusterCA(t, t.TempDir(), f)
	runAuthority(t, a)
	waitReady(t, a)
	return f, a
}

func waitReady(t *testing.T, a *Authority) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.WaitReady(ctx); err != nil {
		t.Fatalf("not ready: %v (%v)", err, a.Ready())
	}
}

// stepUntil steps the fake clock by d and waits for cond.
func stepUntil(t *testing.T, fc *clocktesting.FakeClock, d time.Duration, what string, cond func() bool) {
	t.Helper()
	fc.Step(d)
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		// A renewal that failed sleeps its backoff on the fake clock.
		fc.Step(maxBackoff)
		time.Sleep(5 * time.Millisecond)
	}
}

func TestClusterFirstIntermediateMakesReady(t *testing.T) {
	fc := newFakeClock()
	f := newFakeCluster(t, fc)
	dir := t.TempDir()
	a := newClusterCA(t, dir, f)
	if a.Ready() == nil {
		t.Fatal("ready before the cluster certified an intermediate")
	}
	if _, err := a.MintX509SVID(context.Background(), testID, nil); err == nil {
		t.Fatal("minted before the cluster certified an intermediate")
	}
	runAuthority(t, a)
	waitReady(t, a)

	waitFor(t, "the JWT key registered", func() bool { return heldJWTKeys(a) == 1 })
	svid := mintX509(t, a, testID)
	if err := verifyX509(svid, a.Bundle(), fc.Now()); err != nil {
		t.Fatalf("SVID does not verify against the cluster's roots: %v", err)
	}
	inter := svid.Certificates[1]
	if want, _ := cluster.NodeID(testTD, testNode); len(inter.URIs) != 1 || inter.URIs[0].String() != want.String() {
		t.Errorf("chain's intermediate names %v, want %s", inter.URIs, want)
	}
	if got := a.Bundle().X509Authorities(); len(got) != 1 || !got[0].Equal(f.root.cert) {
		t.Errorf("bundle holds %d authorities, want the cluster root only", len(got))
	}
	for _, name := range []string{IntermediateFile, JWTKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %o, want 0600", name, fi.Mode().Perm())
		}
	}
	if caExp, interExp := a.Expiry(); !caExp.Equal(f.root.cert.NotAfter) || !interExp.Equal(inter.NotAfter) {
		t.Errorf("Expiry = %s, %s; want the root's and the intermediate's", caExp, interExp)
	}
}

func TestClusterRenewsAtHalfLifeWithNewKey(t *testing.T) {
	f, a := startCluster(t)
	fc := f.clock
	first := mintX509(t, a, testID).Certificates[1]
	waitForWaiters(t, fc)

	changed := a.Changed()
	fc.Step(20 * time.Minute)
	time.Sleep(50 * time.Millisecond)
	if n, _ := f.counts(); n != 1 {
		t.Fatalf("renewed before half life: %d requests", n)
	}
	stepUntil(t, fc, 11*time.Minute, "a renewal at half life", func() bool { n, _ := f.counts(); return n == 2 })
	// The fake counts the request before the agent takes the answer.
	var second *x509.Certificate
	waitFor(t, "the renewed intermediate in use", func() bool {
		second = mintX509(t, a, testID).Certificates[1]
		return !second.Equal(first)
	})
	select {
	case <-changed:
	default:
		t.Fatal("Changed did not fire for the renewed intermediate")
	}
	if first.PublicKey.(*ecdsa.PublicKey).Equal(second.PublicKey) {
		t.Fatal("the renewed intermediate has the old key")
	}
}

func TestClusterUnreachableServesUntilExpiry(t *testing.T) {
	f, a := startCluster(t)
	fc := f.clock
	inter := mintX509(t, a, testID).Certificates[1]
	f.setDown(true)

	// Past half life: the renewal fails, the intermediate still signs.
	fc.Step(40 * time.Minute)
	time.Sleep(50 * time.Millisecond)
	svid, err := a.MintX509SVID(context.Background(), testID, nil)
	if err != nil {
		t.Fatalf("mint with a valid intermediate and the API down: %v", err)
	}
	if !svid.Certificates[1].Equal(inter) {
		t.Fatal("signed with another intermediate")
	}
	if err := a.Ready(); err != nil {
		t.Fatalf("not ready while the intermediate is valid: %v", err)
	}

	fc.SetTime(inter.NotAfter)
	if _, err := a.MintX509SVID(context.Background(), testID, nil); err == nil {
		t.Fatal("minted on an expired intermediate")
	}
	if a.Ready() == nil {
		t.Fatal("ready with an expired intermediate")
	}

	f.setDown(false)
	stepUntil(t, fc, time.Second, "recovery once the API is back", func() bool { return a.Ready() == nil })
	mintX509(t, a, testID)
}

func TestClusterRestartServesPersistedIntermediate(t *testing.T) {
	fc := newFakeClock()
	f := newFakeCluster(t, fc)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	a := newClusterCA(t, dir, f)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	waitReady(t, a)
	kid, err := cluster.KeyID(f.lastReceipt().PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	first := mintX509(t, a, testID).Certificates[1]
	cancel()
	<-done

	// The agent restarts while the API server is down: nothing is listed,
	// nothing is signed; what it held is on disk.
	f.setDown(true)
	f.mu.Lock()
	f.published = false
	f.mu.Unlock()
	b := newClusterCA(t, dir, f)
	if err := b.Ready(); err != nil {
		t.Fatalf("restarted agent is not ready on its persisted intermediate: %v", err)
	}
	if got := mintX509(t, b, testID).Certificates[1]; !got.Equal(first) {
		t.Fatal("restarted agent signs with another intermediate than the persisted one")
	}
	token := mintJWT(t, b, testID, "aud")
	if got := tokenKID(t, token); got != kid {
		t.Fatalf("restarted agent signs JWT-SVIDs with kid %q, want the persisted %q", got, kid)
	}
	if err := validateJWT(token, b.Bundle(), "aud"); err != nil {
		t.Fatalf("JWT-SVID does not validate against the persisted bundle: %v", err)
	}
	if err := verifyX509(mintX509(t, b, testID), b.Bundle(), fc.Now()); err != nil {
		t.Fatalf("X.509-SVID does not verify against the persisted bundle: %v", err)
	}
}

// What was persisted for another node (the config changed) is not used.
func TestClusterPersistedForOtherNodeNotUsed(t *testing.T) {
	f := newFakeCluster(t, newFakeClock())
	dir := t.TempDir()
	a := newClusterCA(t, dir, f)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	waitReady(t, a)
	cancel()
	<-done

	f.setDown(true)
	b, err := newCA(context.Background(), Options{
		TrustDomain: testTD, StateDir: dir, Clock: f.clock,
		Cluster: &ClusterOptions{NodeName: "node-b", Signer: f, Trust: f},
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.Ready() == nil {
		t.Fatal("node-b is ready on node-a's intermediate")
	}
}

func TestClusterCorruptStateIsReplaced(t *testing.T) {
	fc := newFakeClock()
	f := newFakeCluster(t, fc)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, IntermediateFile), []byte("-----BEGIN PRIVATE KEY-----\ngarbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	a := newClusterCA(t, dir, f)
	runAuthority(t, a)
	waitReady(t, a)
	mintX509(t, a, testID)
}

// startClusterUnpublished runs a cluster-mode authority whose JWT keys the
// fake publishes only when told, until it holds its intermediate and key.
func startClusterUnpublished(t *testing.T) (*fakeCluster, *Authority) {
	t.Helper()
	f := newFakeCluster(t, newFakeClock())
	f.manualJWKS = true
	a := newClusterCA(t, t.TempDir(), f)
	runAuthority(t, a)
	waitFor(t, "the intermediate and the JWT key", func() bool {
		a.mu.RLock()
		defer a.mu.RUnlock()
		return a.inter != nil && len(a.cluster.jwtKeys) == 1
	})
	return f, a
}

func TestClusterJWTKeyUsedOnlyOncePublished(t *testing.T) {
	f, a := startClusterUnpublished(t)
	fc := f.clock
	if _, _, err := a.MintJWTSVID(context.Background(), testID, []string{"aud"}); err == nil {
		t.Fatal("signed a JWT-SVID with a key not yet in the JWKS")
	}
	// Not ready: a pod started now would get no JWT-SVID.
	if err := a.Ready(); err == nil || !strings.Contains(err.Error(), "JWKS") {
		t.Fatalf("Ready with no JWT key published: %v, want an error naming the JWKS", err)
	}

	changed := a.Changed()
	receipt := f.lastReceipt()
	kid := f.publishKey(receipt)
	waitClosed(t, changed, "Changed when the JWKS changed")
	waitReady(t, a)
	token := mintJWT(t, a, testID, "aud")
	if err := validateJWT(token, a.Bundle(), "aud"); err != nil {
		t.Fatalf("JWT-SVID does not validate against the served bundle: %v", err)
	}
	if got := tokenKID(t, token); got != kid {
		t.Fatalf("kid %q, want %q", got, kid)
	}
	if _, exp, _ := a.MintJWTSVID(context.Background(), testID, []string{"aud"}); exp.After(receipt.NotAfter) {
		t.Errorf("JWT-SVID expires %s, after its key leaves the JWKS at %s", exp, receipt.NotAfter)
	}

	// At half life a new key is registered; the old one signs until the
	// new one is published.
	stepUntil(t, fc, 31*time.Minute, "a new JWT key at half life", func() bool { _, n := f.counts(); return n == 2 })
	if got := tokenKID(t, mintJWT(t, a, testID, "aud")); got != kid {
		t.Fatalf("signed with kid %q before the new key was published", got)
	}
	newKID := f.publishKey(f.lastReceipt())
	waitFor(t, "the new key in use", func() bool { return tokenKID(t, mintJWT(t, a, testID, "aud")) == newKID })
	if _, ok := a.Bundle().FindJWTAuthority(kid); !ok {
		t.Error("the old key, still in the JWKS, left the served bundle")
	}
}

// A JWT signer that never publishes keeps the agent from readiness for
// jwtReadyWait only: then it is ready for X.509-SVIDs, and JWT-SVIDs are
// refused.
func TestClusterReadyWithoutJWTKeyAfterWait(t *testing.T) {
	f, a := startClusterUnpublished(t)
	fc := f.clock
	ready := make(chan error, 1)
	go func() { ready <- a.WaitReady(context.Background()) }()
	fc.Step(jwtReadyWait / 2)
	select {
	case err := <-ready:
		t.Fatalf("WaitReady returned %v half way through the wait for the JWT key", err)
	case <-time.After(50 * time.Millisecond):
	}
	fc.Step(jwtReadyWait / 2)
	select {
	case err := <-ready:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("WaitReady still waiting after the JWT key wait ended: %v", a.Ready())
	}
	mintX509(t, a, testID)
	if _, _, err := a.MintJWTSVID(context.Background(), testID, []string{"aud"}); err == nil {
		t.Fatal("signed a JWT-SVID with no key published")
	}
}

func TestClusterBundleChangeFiresChanged(t *testing.T) {
	f, a := startCluster(t)
	fc := f.clock

	next, err := newRoot(testTD, fc.Now())
	if err != nil {
		t.Fatal(err)
	}
	changed := a.Changed()
	f.publish(func(tr *Trust) { tr.Roots = append(tr.Roots, next.cert) })
	waitClosed(t, changed, "Changed on a new root")
	if got := a.Bundle().X509Authorities(); len(got) != 2 {
		t.Fatalf("bundle holds %d roots, want 2", len(got))
	}

	// The same trust again is no change.
	changed = a.Changed()
	f.publish(func(*Trust) {})
	time.Sleep(50 * time.Millisecond)
	select {
	case <-changed:
		t.Fatal("Changed fired though the bundle stayed the same")
	default:
	}
}

// When the root that signed the intermediate leaves the bundle (a root
// replaced under the controller), the intermediate is renewed at once.
func TestClusterRenewsWhenIssuerLeavesBundle(t *testing.T) {
	f, a := startCluster(t)
	fc := f.clock
	first := mintX509(t, a, testID).Certificates[1]

	next, err := newRoot(testTD, fc.Now())
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.root = next
	f.mu.Unlock()
	f.publish(func(tr *Trust) { tr.Roots = []*x509.Certificate{next.cert} })
	waitFor(t, "a new intermediate", func() bool { n, _ := f.counts(); return n == 2 })
	waitFor(t, "the new intermediate in use", func() bool {
		svid := mintX509(t, a, testID)
		return !svid.Certificates[1].Equal(first) && verifyX509(svid, a.Bundle(), fc.Now()) == nil
	})
}

func TestClusterOptionsRefused(t *testing.T) {
	fc := newFakeClock()
	f := newFakeCluster(t, fc)
	u := writeUpstream(t, upstreamKinds[0], fc.Now())
	for name, o := range map[string]Options{
		"upstream files": {UpstreamCertFile: u.certFile, UpstreamKeyFile: u.keyFile, StateDir: t.TempDir(),
			Cluster: &ClusterOptions{NodeName: testNode, Signer: f, Trust: f}},
		"no node":   {StateDir: t.TempDir(), Cluster: &ClusterOptions{Signer: f, Trust: f}},
		"no signer": {StateDir: t.TempDir(), Cluster: &ClusterOptions{NodeName: testNode, Trust: f}},
		"no dir":    {Cluster: &ClusterOptions{NodeName: testNode, Signer: f, Trust: f}},
	} {
		o.TrustDomain = testTD
		if _, err := newCA(context.Background(), o); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
}

// JWT-SVIDs carry iss when JWTIssuer is set, in every mode.
func TestJWTIssuer(t *testing.T) {
	for _, iss := range []string{"", "https://oidc.example.org"} {
		a := newSelfManaged(t, t.TempDir(), newFakeClock(), func(o *Options) { o.JWTIssuer = iss })
		svid, err := jwtsvid.ParseInsecure(mintJWT(t, a, testID, "aud"), []string{"aud"})
		if err != nil {
			t.Fatal(err)
		}
		got, present := svid.Claims["iss"]
		switch {
		case iss == "" && present:
			t.Errorf("iss %v present without JWTIssuer", got)
		case iss != "" && got != iss:
			t.Errorf("iss = %v, want %q", got, iss)
		}
	}
}

func heldJWTKeys(a *Authority) int {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return len(a.cluster.jwtKeys)
}

func tokenKID(t *testing.T, token string) string {
	t.Helper()
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	return jws.Signatures[0].Header.KeyID
}

func FuzzParseKeyPair(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	fc := newFakeClock()
	root, err := newRoot(testTD, fc.Now())
	if err != nil {
		f.Fatal(err)
	}
	dir := f.TempDir()
	if err := writeKeyPair(filepath.Join(dir, "p.pem"), key, root.cert); err != nil {
		f.Fatal(err)
	}
	if err := writeKeyPair(filepath.Join(dir, "q.pem"), root.key.(*ecdsa.PrivateKey), root.cert); err != nil {
		f.Fatal(err)
	}
	for _, n := range []string{"p.pem", "q.pem"} {
		data, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := parseKeyPair(data)
		if err != nil {
			return
		}
		if !p.key.Public().(*ecdsa.PublicKey).Equal(p.cert.PublicKey) {
			t.Fatal("accepted a key that does not match its certificate")
		}
	})
}

func FuzzParseTrust(f *testing.F) {
	fc := newFakeClock()
	root, err := newRoot(testTD, fc.Now())
	if err != nil {
		f.Fatal(err)
	}
	kid, err := cluster.KeyID(root.key.Public())
	if err != nil {
		f.Fatal(err)
	}
	path := filepath.Join(f.TempDir(), TrustFile)
	for _, tr := range []Trust{
		{},
		{Roots: []*x509.Certificate{root.cert, root.cert}, JWTKeys: []cluster.JWTKey{{Node: "n", KeyID: kid, Public: root.key.Public(), NotAfter: fc.Now()}}},
	} {
		if err := writeTrust(path, tr); err != nil {
			f.Fatal(err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		back, err := parseTrust(data)
		if err != nil || len(back.Roots) != len(tr.Roots) || len(back.JWTKeys) != len(tr.JWTKeys) {
			f.Fatalf("round trip of %d roots, %d keys: %+v, %v", len(tr.Roots), len(tr.JWTKeys), back, err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		tr, err := parseTrust(data)
		if err != nil {
			return
		}
		for _, k := range tr.JWTKeys {
			if k.KeyID == "" || k.Public == nil {
				t.Fatalf("accepted a JWT key without id or key: %+v", k)
			}
		}
	})
}
