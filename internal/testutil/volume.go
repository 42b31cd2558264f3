package testutil

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Volume is a directory laid out the way kubelet mounts a Secret or
// ConfigMap: each file is a symlink through "..data" to a timestamped
// directory, and an update re-points "..data" in one rename and then
// deletes the old directory.
type Volume struct {
	t   testing.TB
	dir string
	n   int
}

// NewVolume creates a volume in a temporary directory holding files.
func NewVolume(t testing.TB, files map[string][]byte) *Volume {
	t.Helper()
	v := &Volume{t: t, dir: t.TempDir()}
	v.Publish(files)
	return v
}

// Path is where a file of the volume is read.
func (v *Volume) Path(name string) string { return filepath.Join(v.dir, name) }

// Publish replaces the volume's content with files, atomically as kubelet does.
func (v *Volume) Publish(files map[string][]byte) {
	t := v.t
	t.Helper()
	v.n++
	data := fmt.Sprintf("..2026_01_01_00_00_00.%d", v.n)
	if err := os.Mkdir(filepath.Join(v.dir, data), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		// Secrets are mounted 0644 unless defaultMode says otherwise.
		if err := os.WriteFile(filepath.Join(v.dir, data, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old, _ := os.Readlink(filepath.Join(v.dir, "..data"))
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(data, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(v.dir, old)); err != nil {
			t.Fatal(err)
		}
	}
	for name := range files {
		link := v.Path(name)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
			t.Fatal(err)
		}
	}
}
