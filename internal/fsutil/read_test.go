package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadFileLimited(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	if err := os.WriteFile(file, []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		path    string
		limit   int64
		want    string
		wantErr string
	}{
		{"under the limit", file, 6, "12345", ""},
		{"at the limit", file, 5, "12345", ""},
		{"over the limit", file, 4, "", "larger than 4 bytes"},
		{"missing", filepath.Join(dir, "nope"), 10, "", "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadFileLimited(tc.path, tc.limit)
			switch {
			case tc.wantErr == "" && (err != nil || string(got) != tc.want):
				t.Fatalf("ReadFileLimited = %q, %v", got, err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("ReadFileLimited = %v, want %q", err, tc.wantErr)
			}
		})
	}
	if _, err := ReadFileLimited(filepath.Join(dir, "nope"), 1); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a missing file's error is %v, want one wrapping os.ErrNotExist", err)
	}
}
