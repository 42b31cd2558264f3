package spire

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// The SPIRE build lock: a second builder waits for the first (the
// background prebuild and the interop test), or gives up with its context.
func TestLockFileWaitsForTheHolder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.lock")
	logf := func(string, ...any) {}
	unlock, err := lockFile(context.Background(), path, logf)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan func(), 1)
	go func() {
		u, err := lockFile(context.Background(), path, logf)
		if err != nil {
			t.Error(err)
			return
		}
		got <- u
	}()
	select {
	case <-got:
		t.Fatal("a second holder took the lock while the first held it")
	case <-time.After(1500 * time.Millisecond):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := lockFile(ctx, path, logf); err == nil {
		t.Fatal("took the held lock with a context that ended")
	}
	unlock()
	select {
	case u := <-got:
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting holder did not get the lock once it was free")
	}
}
