package svidcache

import (
	"sync"
	"testing"
	"time"
)

func TestMintedHook(t *testing.T) {
	f := newFixture(t, nil)
	type mint struct {
		kind     string
		rotation bool
	}
	var (
		mu  sync.Mutex
		got []mint
	)
	f.cache = New(f.auth, Options{Clock: f.fc, Minted: func(kind string, rotation bool) {
		mu.Lock()
		got = append(got, mint{kind, rotation})
		mu.Unlock()
	}})
	f.x509(t, webID)
	f.x509(t, webID) // cached: no mint
	f.jwt(t, webID, "db")
	f.fc.Step(31 * time.Minute)
	f.x509(t, webID) // past half life: renewed
	want := []mint{{"x509", false}, {"jwt", false}, {"x509", true}}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Fatalf("minted %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("minted %v, want %v", got, want)
		}
	}
}
