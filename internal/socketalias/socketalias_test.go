package socketalias

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func links(t *testing.T, dir string, names ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range names {
		cur, err := os.Readlink(filepath.Join(dir, n))
		if err != nil {
			cur = "(" + err.Error() + ")"
		}
		out[n] = cur
	}
	return out
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, dir string)
		wantErr bool
	}{
		{"fresh directory", func(*testing.T, string) {}, false},
		{"a link left by an earlier run is kept", func(t *testing.T, dir string) {
			if err := os.Symlink("spire-agent.sock", filepath.Join(dir, "socket")); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"a link to something else is re-pointed", func(t *testing.T, dir string) {
			if err := os.Symlink("/etc/passwd", filepath.Join(dir, "api.sock")); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"someone's file is refused", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "api.sock"), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.prepare(t, dir)
			_, err := New(Options{Dir: dir, Target: "spire-agent.sock", Names: []string{"socket", "api.sock"}, Poll: time.Second})
			got := links(t, dir, "socket", "api.sock")
			if tc.wantErr {
				if err == nil {
					t.Fatal("New succeeded")
				}
				// Nothing half made: the alias made before the refusal is gone.
				if _, err := os.Lstat(filepath.Join(dir, "socket")); !os.IsNotExist(err) {
					t.Fatalf("alias socket left after the refusal: %v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for n, cur := range got {
				// Relative: it resolves wherever the directory is mounted.
				if cur != "spire-agent.sock" {
					t.Errorf("%s -> %s, want spire-agent.sock", n, cur)
				}
			}
		})
	}
}

func TestRunKeepsAndRemoves(t *testing.T) {
	dir := t.TempDir()
	a, err := New(Options{Dir: dir, Target: "agent.sock", Names: []string{"socket", "api.sock"}, Poll: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	wait := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: links %v", what, links(t, dir, "socket", "api.sock"))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := os.Remove(filepath.Join(dir, "socket")); err != nil {
		t.Fatal(err)
	}
	wait("a deleted alias is re-made", func() bool { return links(t, dir, "socket")["socket"] == "agent.sock" })
	if err := os.Remove(filepath.Join(dir, "api.sock")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("elsewhere", filepath.Join(dir, "api.sock")); err != nil {
		t.Fatal(err)
	}
	wait("a changed alias is re-pointed", func() bool { return links(t, dir, "api.sock")["api.sock"] == "agent.sock" })
	// Someone's file in place of an alias is left alone, and so at the end.
	if err := os.Remove(filepath.Join(dir, "api.sock")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "api.sock"), []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	done <- nil
	if _, err := os.Lstat(filepath.Join(dir, "socket")); !os.IsNotExist(err) {
		t.Fatalf("alias socket left after Run ended: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "api.sock")); err != nil || string(b) != "mine" {
		t.Fatalf("someone's file in place of an alias: %q, %v", b, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("left in the directory: %v", ents)
	}
}
