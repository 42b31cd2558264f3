package testutil

import (
	"os"
	"path/filepath"
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

// CopyTestBinary copies the running test binary to dir/name (0755), so a
// child of another uid can run it from a PublicTempDir.
func CopyTestBinary(t testing.TB, dir, name string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, name)
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}
