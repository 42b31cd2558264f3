package svidcache

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/csi-agent/csi-agent/internal/ca"
)

var apiID = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/api")

func woken(s *Subscription) bool {
	select {
	case <-s.C():
		return true
	default:
		return false
	}
}

// Which subscriptions a change wakes: renewals wake the holders of the
// renewed SVID only, Notify wakes all.
func TestSubscriptionWakes(t *testing.T) {
	tests := []struct {
		name   string
		change func(t *testing.T, f *fixture)
		// want[i]: subscription i is woken. They watch, in order: web,
		// web with DNS names, db, web and db, nothing; the last is closed.
		want []bool
	}{
		{
			name: "on-demand renewal of web",
			change: func(t *testing.T, f *fixture) {
				f.fc.Step(31 * time.Minute)
				f.x509(t, webID)
			},
			want: []bool{true, false, false, true, false, false},
		},
		{
			name: "renewal of web with DNS names, names reordered",
			change: func(t *testing.T, f *fixture) {
				f.fc.Step(31 * time.Minute)
				f.x509(t, webID, "B.example.org", "a.example.org")
			},
			want: []bool{false, true, false, false, false, false},
		},
		{
			name: "Notify",
			change: func(t *testing.T, f *fixture) {
				f.cache.Notify()
			},
			want: []bool{true, true, true, true, true, false},
		},
		{
			name:   "cache hit",
			change: func(t *testing.T, f *fixture) { f.x509(t, webID); f.x509(t, dbID) },
			want:   []bool{false, false, false, false, false, false},
		},
		{
			name:   "JWT-SVID minted",
			change: func(t *testing.T, f *fixture) { f.jwt(t, webID, "api") },
			want:   []bool{false, false, false, false, false, false},
		},
		{
			name:   "first mint of an SVID nobody watches",
			change: func(t *testing.T, f *fixture) { f.x509(t, apiID) },
			want:   []bool{false, false, false, false, false, false},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			watch := [][]X509Key{
				{{ID: webID}},
				{{ID: webID, DNSNames: []string{"a.example.org", "b.example.org"}}},
				{{ID: dbID}},
				{{ID: webID}, {ID: dbID}},
				nil,
				{{ID: webID}, {ID: dbID}},
			}
			subs := make([]*Subscription, len(watch))
			for i, w := range watch {
				subs[i] = f.cache.Subscribe()
				subs[i].Watch(w)
				for _, k := range w {
					f.x509(t, k.ID, k.DNSNames...)
				}
			}
			subs[len(subs)-1].Close()
			// The reads above minted and so woke their own holders.
			for _, s := range subs {
				woken(s)
			}
			tt.change(t, f)
			for i, s := range subs {
				if got := woken(s); got != tt.want[i] {
					t.Errorf("subscription %d (watching %v) woken = %v, want %v", i, watch[i], got, tt.want[i])
				}
			}
		})
	}
}

func TestSubscriptionWakesOnProactiveRenewalAndAuthorityChange(t *testing.T) {
	f := newFixture(t, func(o *ca.Options) { o.IntermediateTTL = 3 * time.Hour })
	f.run(t)
	ctx, cancel := context.WithCancel(context.Background())
	authDone := make(chan struct{})
	go func() { defer close(authDone); _ = f.auth.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-authDone })

	web, db, none := f.cache.Subscribe(), f.cache.Subscribe(), f.cache.Subscribe()
	web.Watch([]X509Key{{ID: webID}})
	db.Watch([]X509Key{{ID: dbID}})
	f.x509(t, webID)
	f.fc.Step(10 * time.Minute)
	f.x509(t, dbID) // renewed ten minutes after web
	for _, s := range []*Subscription{web, db, none} {
		woken(s)
	}

	f.waitForTimer(t)
	f.fc.Step(21 * time.Minute) // web past half life, db not
	waitClosed(t, web.C(), "web's wake-up after Run renewed it")
	if woken(db) || woken(none) {
		t.Error("Run's renewal of web woke a subscription not watching it")
	}

	// The authority rotates its intermediate at half of its 3h; only that
	// wakes the subscription watching nothing, and it wakes everyone.
	for i := 0; !woken(none); i++ {
		if i == 8 {
			t.Fatal("authority change did not wake the subscription watching nothing")
		}
		woken(web)
		woken(db)
		f.waitForTimer(t)
		f.fc.Step(15 * time.Minute)
		time.Sleep(10 * time.Millisecond)
	}
	if !woken(web) || !woken(db) {
		t.Error("authority change did not wake every subscription")
	}
}

func TestSubscriptionWatchReplaces(t *testing.T) {
	f := newFixture(t, nil)
	s := f.cache.Subscribe()
	defer s.Close()
	s.Watch([]X509Key{{ID: webID}})
	s.Watch([]X509Key{{ID: dbID}, {ID: dbID}})
	f.x509(t, webID)
	f.x509(t, dbID)
	woken(s)

	f.fc.Step(31 * time.Minute)
	f.x509(t, webID)
	if woken(s) {
		t.Error("renewal of an SVID no longer watched woke the subscription")
	}
	f.x509(t, dbID)
	if !woken(s) {
		t.Error("renewal of the watched SVID did not wake the subscription")
	}
}

// Subscriptions leave nothing behind when closed, however they watched.
func TestSubscriptionCloseReleases(t *testing.T) {
	f := newFixture(t, nil)
	var subs []*Subscription
	for i := range 100 {
		s := f.cache.Subscribe()
		s.Watch([]X509Key{{ID: webID}, {ID: spiffeid.RequireFromPath(testTD, "/n/"+string(rune('a'+i%26)))}})
		if i%2 == 0 {
			s.Watch([]X509Key{{ID: dbID}})
		}
		subs = append(subs, s)
	}
	for _, s := range subs {
		s.Close()
		s.Close()
		s.Watch([]X509Key{{ID: webID}}) // after Close: ignored
	}
	f.cache.subMu.Lock()
	defer f.cache.subMu.Unlock()
	if len(f.cache.subs) != 0 || len(f.cache.watchers) != 0 {
		t.Errorf("%d subscriptions and %d watched keys left after closing all", len(f.cache.subs), len(f.cache.watchers))
	}
}

// A holder that watches, reads, and waits, over and over, sees the last of
// many renewals: a renewal racing with its read is never lost. Run with -race.
func TestSubscriptionMissesNoRenewal(t *testing.T) {
	f := newFixture(t, nil)
	const (
		holders  = 16
		renewals = 20
		step     = 31 * time.Minute // past half of the 1h lifetime
	)
	f.x509(t, webID)
	// Only the SVID of the last renewal lives past this.
	lastBorn := f.fc.Now().Add(renewals*step + 30*time.Minute)
	var (
		wg   sync.WaitGroup
		errs = make(chan error, holders)
	)
	for range holders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := f.cache.Subscribe()
			defer s.Close()
			for {
				s.Watch([]X509Key{{ID: webID}})
				svid, _, err := f.cache.X509SVID(context.Background(), webID, nil)
				if err != nil {
					errs <- err
					return
				}
				if svid.Certificates[0].NotAfter.After(lastBorn) {
					return
				}
				select {
				case <-s.C():
				case <-time.After(10 * time.Second):
					errs <- fmt.Errorf("holder of the SVID expiring %s not woken by a later renewal", svid.Certificates[0].NotAfter)
					return
				}
			}
		}()
	}
	for range renewals {
		f.fc.Step(step)
		f.x509(t, webID)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A mint through a subscription wakes the entry's other holders, not the
// subscription that asked: it has the new SVID already.
func TestMintDoesNotWakeTheAsker(t *testing.T) {
	f := newFixture(t, nil)
	id := spiffeid.RequireFromPath(testTD, "/w")
	asker, other := f.cache.Subscribe(), f.cache.Subscribe()
	defer asker.Close()
	defer other.Close()
	for _, s := range []*Subscription{asker, other} {
		s.Watch([]X509Key{{ID: id}})
	}
	if _, minted, err := asker.X509SVID(context.Background(), id, nil); err != nil || !minted {
		t.Fatalf("X509SVID = minted %v, %v", minted, err)
	}
	select {
	case <-other.C():
	case <-time.After(5 * time.Second):
		t.Fatal("another holder was not woken by the mint")
	}
	select {
	case <-asker.C():
		t.Fatal("the subscription that minted was woken by its own mint")
	case <-time.After(50 * time.Millisecond):
	}
}
