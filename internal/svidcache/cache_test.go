package svidcache

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/internal/ca"
)

var (
	testTD = spiffeid.RequireTrustDomainFromString("example.org")
	webID  = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	dbID   = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/db")
)

type fixture struct {
	fc    *clocktesting.FakeClock
	auth  *ca.Authority
	cache *Cache
}

// newFixture starts the fake clock a little before the real time: go-spiffe's
// JWT validation reads the real clock (with a minute of leeway), so tokens
// must be minted close to it, even after a test steps a few minutes ahead.
func newFixture(t testing.TB, mod func(*ca.Options)) *fixture {
	t.Helper()
	fc := clocktesting.NewFakeClock(time.Now().Add(-3 * time.Minute))
	opts := ca.Options{TrustDomain: testTD, StateDir: t.TempDir(), Clock: fc, X509SVIDTTL: time.Hour, JWTSVIDTTL: 5 * time.Minute, IntermediateTTL: 24 * time.Hour}
	if mod != nil {
		mod(&opts)
	}
	auth, err := ca.New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{fc: fc, auth: auth, cache: New(auth, Options{Clock: fc})}
}

func (f *fixture) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.cache.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func (f *fixture) x509(t *testing.T, id spiffeid.ID, dns ...string) *x509svid.SVID {
	t.Helper()
	s, _, err := f.cache.X509SVID(context.Background(), id, dns)
	if err != nil {
		t.Fatalf("X509SVID(%s, %v): %v", id, dns, err)
	}
	if _, _, err := x509svid.Verify(s.Certificates, f.auth.Bundle(), x509svid.WithTime(f.fc.Now())); err != nil {
		t.Fatalf("cached SVID does not verify: %v", err)
	}
	return s
}

func (f *fixture) jwt(t *testing.T, id spiffeid.ID, aud ...string) string {
	t.Helper()
	jwt, _, err := f.cache.JWTSVID(context.Background(), id, aud)
	if err != nil {
		t.Fatalf("JWTSVID(%s, %v): %v", id, aud, err)
	}
	token := jwt.Token
	if _, err := jwtsvid.ParseAndValidate(token, f.auth.Bundle(), aud[:1]); err != nil {
		t.Fatalf("cached JWT-SVID does not validate: %v", err)
	}
	return token
}

// watch subscribes to renewals of ids; with none, to what concerns all.
func (f *fixture) watch(t *testing.T, ids ...spiffeid.ID) *Subscription {
	t.Helper()
	s := f.cache.Subscribe()
	t.Cleanup(s.Close)
	keys := make([]X509Key, 0, len(ids))
	for _, id := range ids {
		keys = append(keys, X509Key{ID: id})
	}
	s.Watch(keys)
	return s
}

func (f *fixture) waitForTimer(t *testing.T) {
	t.Helper()
	eventually(t, "a timer on the fake clock", f.fc.HasWaiters)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func notClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("%s fired", what)
	default:
	}
}

func (c *Cache) sizes() (x509, jwt int) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.x509.entries), len(c.jwt.entries)
}

func TestX509SVIDCacheKeys(t *testing.T) {
	f := newFixture(t, nil)
	base := f.x509(t, webID, "web.example.org", "api.example.org")
	tests := []struct {
		name string
		id   spiffeid.ID
		dns  []string
		same bool
	}{
		{"identical", webID, []string{"web.example.org", "api.example.org"}, true},
		{"reordered", webID, []string{"api.example.org", "web.example.org"}, true},
		{"case and trailing dot", webID, []string{"API.example.org.", "web.example.org", "web.example.org"}, true},
		{"subset", webID, []string{"web.example.org"}, false},
		{"no DNS", webID, nil, false},
		{"other ID", dbID, []string{"web.example.org", "api.example.org"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := f.x509(t, tt.id, tt.dns...)
			if (got == base) != tt.same {
				t.Errorf("same SVID = %v, want %v", got == base, tt.same)
			}
			if got.ID != tt.id {
				t.Errorf("ID = %s, want %s", got.ID, tt.id)
			}
		})
	}
	if n := f.cache.mints.Load(); n != 4 {
		t.Errorf("%d mints, want 4 (one per distinct key)", n)
	}
}

func TestX509SVIDRenewedPastHalfLife(t *testing.T) {
	f := newFixture(t, nil)
	first := f.x509(t, webID)
	changed := f.watch(t, webID).C()

	f.fc.Step(29 * time.Minute)
	if f.x509(t, webID) != first {
		t.Fatal("re-minted before half life")
	}
	notClosed(t, changed, "Changed before half life")

	f.fc.Step(2 * time.Minute)
	second := f.x509(t, webID)
	if second == first || second.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) == 0 {
		t.Fatal("not re-minted past half life")
	}
	// Streams holding the old one must hear about it.
	waitClosed(t, changed, "Changed after on-demand renewal")
	if f.x509(t, webID) != second {
		t.Error("renewed SVID not cached")
	}
}

func TestRunRenewsAtHalfLife(t *testing.T) {
	f := newFixture(t, nil)
	f.run(t)
	first := f.x509(t, webID)
	f.x509(t, dbID)
	changed := f.watch(t, webID).C()

	f.waitForTimer(t)
	f.fc.Step(31 * time.Minute)
	waitClosed(t, changed, "Changed after proactive renewal")
	eventually(t, "both SVIDs renewed", func() bool { return f.cache.mints.Load() == 4 })

	second := f.x509(t, webID)
	if second == first {
		t.Fatal("Run did not renew the SVID")
	}
	if n := f.cache.mints.Load(); n != 4 {
		t.Errorf("%d mints, want 4: a request after proactive renewal must hit the cache", n)
	}
	if !second.Certificates[0].NotAfter.After(first.Certificates[0].NotAfter) {
		t.Error("renewed SVID does not live longer")
	}
}

func TestRunEvictsIdleEntries(t *testing.T) {
	f := newFixture(t, nil)
	f.run(t)
	f.x509(t, webID)
	f.jwt(t, webID, "api")
	if x, j := f.cache.sizes(); x != 1 || j != 1 {
		t.Fatalf("sizes %d/%d, want 1/1", x, j)
	}

	// Nobody asks again: the JWT entry (5m) and then the X.509 one (1h)
	// leave the cache, the latter after one proactive renewal.
	empty := func() bool { x, j := f.cache.sizes(); return x == 0 && j == 0 }
	steps := 0
	for ; steps < 20; steps++ {
		eventually(t, "a timer or an empty cache", func() bool { return empty() || f.fc.HasWaiters() })
		if empty() {
			break
		}
		f.fc.Step(5*time.Minute + time.Second)
	}
	if elapsed := time.Duration(steps) * (5*time.Minute + time.Second); elapsed < time.Hour || elapsed > time.Hour+6*time.Minute {
		t.Errorf("cache emptied after %s, want just past the 1h lifetime", elapsed)
	}

	before := f.cache.mints.Load()
	f.x509(t, webID)
	if f.cache.mints.Load() != before+1 {
		t.Error("request after eviction did not mint")
	}
}

func TestRunKeepsEntriesInUse(t *testing.T) {
	f := newFixture(t, nil)
	f.run(t)
	f.x509(t, webID)
	// A subscriber re-reads on every change, as a Workload API stream does.
	ch := f.watch(t, webID).C()
	for i := 0; i < 8; i++ {
		f.waitForTimer(t)
		f.fc.Step(31 * time.Minute)
		waitClosed(t, ch, "Changed")
		f.x509(t, webID)
		if x, _ := f.cache.sizes(); x != 1 {
			t.Fatalf("entry in use was evicted after %d renewals", i+1)
		}
	}
}

func TestRunForwardsAuthorityChanges(t *testing.T) {
	f := newFixture(t, func(o *ca.Options) { o.IntermediateTTL = time.Hour })
	f.run(t)
	ctx, cancel := context.WithCancel(context.Background())
	authDone := make(chan struct{})
	go func() { defer close(authDone); _ = f.auth.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-authDone })

	changed := f.watch(t).C()
	f.waitForTimer(t) // the authority's rotation timer; the empty cache has none
	f.fc.Step(31 * time.Minute)
	waitClosed(t, changed, "Changed forwarded from the authority")
}

func TestNotify(t *testing.T) {
	f := newFixture(t, nil)
	ch := f.watch(t).C()
	f.cache.Notify()
	waitClosed(t, ch, "wake-up after Notify")
	notClosed(t, ch, "a second wake-up from one Notify")
	f.cache.Notify()
	waitClosed(t, ch, "wake-up after the next Notify")
}

func TestConcurrentCallersMintOnce(t *testing.T) {
	f := newFixture(t, nil)
	const n = 32
	var (
		wg     sync.WaitGroup
		start  = make(chan struct{})
		svids  = make([]*x509svid.SVID, n)
		tokens = make([]JWT, n)
		minted = make([]bool, 2*n)
		errs   = make([]error, 2*n)
	)
	for i := range n {
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			svids[i], minted[i], errs[i] = f.cache.X509SVID(context.Background(), webID, nil)
		}()
		go func() {
			defer wg.Done()
			<-start
			tokens[i], minted[n+i], errs[n+i] = f.cache.JWTSVID(context.Background(), webID, []string{"api"})
		}()
	}
	close(start)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if svids[i] != svids[0] || tokens[i] != tokens[0] {
			t.Fatalf("caller %d got a different SVID or token", i)
		}
	}
	if m := f.cache.mints.Load(); m != 2 {
		t.Errorf("%d mints for %d concurrent callers of two uncached keys, want 2", m, 2*n)
	}
	// Exactly one caller per key is told it minted: the one to audit.
	if x, j := count(minted[:n]), count(minted[n:]); x != 1 || j != 1 {
		t.Errorf("minted reported to %d X.509 and %d JWT callers, want 1 and 1", x, j)
	}
}

func TestJWTSVIDCache(t *testing.T) {
	f := newFixture(t, nil) // 5m JWT TTL
	first := f.jwt(t, webID, "api", "db")
	if f.jwt(t, webID, "db", "api", "api") != first {
		t.Error("same audience set in another order missed the cache")
	}
	if f.jwt(t, webID, "api") == first {
		t.Error("different audience set hit the cache")
	}
	if f.jwt(t, dbID, "api", "db") == first {
		t.Error("different ID hit the cache")
	}
	// Length-prefixed keys: a NUL inside one audience is not a separator.
	a := f.jwt(t, webID, "x\x00y")
	if b := f.jwt(t, webID, "x", "y"); a == b {
		t.Error(`["x\x00y"] and ["x","y"] share a cache entry`)
	}

	f.fc.Step(2*time.Minute + 31*time.Second)
	if f.jwt(t, webID, "api", "db") == first {
		t.Error("JWT-SVID not renewed past half life")
	}

	if _, _, err := f.cache.JWTSVID(context.Background(), webID, nil); err == nil {
		t.Error("empty audience accepted")
	}
}

func TestErrorsAreNotCached(t *testing.T) {
	f := newFixture(t, nil)
	foreign := spiffeid.RequireFromString("spiffe://evil.org/x")
	for range 2 {
		if _, _, err := f.cache.X509SVID(context.Background(), foreign, nil); err == nil {
			t.Fatal("minted for a foreign trust domain")
		}
	}
	if x, _ := f.cache.sizes(); x != 0 {
		t.Error("failed mint left a cache entry")
	}
	if f.cache.mints.Load() != 2 {
		t.Error("an error was served from the cache")
	}
}

// A transient minting failure keeps serving the still-valid SVID and retries
// later; once it expires the error surfaces.
func TestRenewalFailureServesValidSVID(t *testing.T) {
	f := newFixture(t, nil)
	first := f.x509(t, webID)
	realMint := f.cache.x509.mint
	var failing sync.Mutex
	fail := true
	f.cache.x509.mint = func(ctx context.Context, req request) (*x509svid.SVID, time.Time, error) {
		failing.Lock()
		defer failing.Unlock()
		if fail {
			return nil, time.Time{}, errors.New("signer unavailable")
		}
		return realMint(ctx, req)
	}

	f.fc.Step(31 * time.Minute)
	if got := f.x509(t, webID); got != first {
		t.Fatal("did not fall back to the valid SVID")
	}
	mints := f.cache.mints.Load()
	f.fc.Step(10 * time.Second)
	f.x509(t, webID)
	if f.cache.mints.Load() != mints {
		t.Error("retried before the retry delay")
	}

	holder := f.watch(t, webID)
	f.fc.Step(30 * time.Minute) // past the leaf's expiry
	if s, _, err := f.cache.X509SVID(context.Background(), webID, nil); err == nil {
		t.Fatalf("served an expired SVID (NotAfter %s)", s.Certificates[0].NotAfter)
	}
	// Holders of the expired SVID hear of it, to fail rather than keep it.
	waitClosed(t, holder.C(), "wake-up when the SVID expired unrenewed")

	failing.Lock()
	fail = false
	failing.Unlock()
	if f.x509(t, webID) == first {
		t.Error("recovered cache still serves the old SVID")
	}
}

func count(bs []bool) int {
	n := 0
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

// minted is true exactly for the call that minted: the first, and the first
// past half life; never for a cache hit or a failed renewal served from
// the previous SVID.
func TestMintedReported(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	steps := []struct {
		name    string
		advance time.Duration
		x509    bool
		jwt     bool
	}{
		{"first use", 0, true, true},
		{"cache hit", time.Minute, false, false},
		{"JWT past half life", 2 * time.Minute, false, true},
		{"X.509 past half life", 30 * time.Minute, true, true},
		{"hit after renewal", time.Second, false, false},
	}
	for _, st := range steps {
		f.fc.Step(st.advance)
		_, x, err := f.cache.X509SVID(ctx, webID, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, j, err := f.cache.JWTSVID(ctx, webID, []string{"api"})
		if err != nil {
			t.Fatal(err)
		}
		if x != st.x509 || j != st.jwt {
			t.Errorf("%s: minted X.509 %v, JWT %v; want %v, %v", st.name, x, j, st.x509, st.jwt)
		}
	}
	f.cache.x509.mint = func(context.Context, request) (*x509svid.SVID, time.Time, error) {
		return nil, time.Time{}, errors.New("signer unavailable")
	}
	f.fc.Step(31 * time.Minute)
	if _, minted, err := f.cache.X509SVID(ctx, webID, nil); err != nil || minted {
		t.Errorf("failed renewal served the previous SVID with minted %v, err %v; want false, nil", minted, err)
	}
}

func TestCanonical(t *testing.T) {
	tests := []struct {
		a, b []string
		dns  bool
		same bool
	}{
		{nil, []string{}, false, true},
		{[]string{"a", "b"}, []string{"b", "a", "a"}, false, true},
		{[]string{"A"}, []string{"a"}, false, false},
		{[]string{"A."}, []string{"a"}, true, true},
		{[]string{"ab"}, []string{"a", "b"}, false, false},
		{[]string{"a\x00b"}, []string{"a", "b"}, false, false},
		{[]string{""}, nil, false, false},
	}
	for _, tt := range tests {
		if got := canonical(tt.a, tt.dns) == canonical(tt.b, tt.dns); got != tt.same {
			t.Errorf("canonical(%q) == canonical(%q): %v, want %v", tt.a, tt.b, got, tt.same)
		}
	}
}

func BenchmarkX509SVIDCached(b *testing.B) {
	f := newFixture(b, nil)
	ctx := context.Background()
	if _, _, err := f.cache.X509SVID(ctx, webID, nil); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := f.cache.X509SVID(ctx, webID, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := f.cache.X509SVID(ctx, webID, nil); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("with-dns", func(b *testing.B) {
		dns := []string{"web.example.org", "api.example.org"}
		if _, _, err := f.cache.X509SVID(ctx, webID, dns); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := f.cache.X509SVID(ctx, webID, dns); err != nil {
				b.Fatal(err)
			}
		}
	})
}
