package testutil

import (
	"os"
	"testing"
)

// PublicTempDir makes a temporary directory every uid may traverse, for
// tests whose children run as other users and must reach a socket or a
// binary in it (t.TempDir's parent is closed to them). It is removed when
// the test ends.
func PublicTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
