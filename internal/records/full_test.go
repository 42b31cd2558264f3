package records

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// smallTmpfs mounts a tmpfs of size on a temp dir (root only), to fill up.
func smallTmpfs(t *testing.T, size string) string {
	t.Helper()
	testutil.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// A state dir on a full filesystem must still open: the journal is readable,
// and refusing to start would cost every pod on the node its identity.
func TestOpenOnFullFilesystem(t *testing.T) {
	dir := smallTmpfs(t, "256k")
	recDir := filepath.Join(dir, "records")

	s, err := Open(recDir)
	if err != nil {
		t.Fatal(err)
	}
	// Enough churn that the journal holds more lines than live records,
	// so the next Open rewrites it.
	for i := range 40 {
		r := rec(fmt.Sprintf("/var/lib/kubelet/pods/p%d/volumes/kubernetes.io~csi/v/mount", i%4), fmt.Sprintf("uid-%d", i%4))
		if err := s.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	want := s.All()
	s.Close()

	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill: %v", err)
			}
			break
		}
	}
	f.Close()

	s, err = Open(recDir)
	if err != nil {
		t.Fatalf("Open on a full filesystem: %v", err)
	}
	if got := s.All(); len(got) != len(want) {
		t.Fatalf("%d records after open, want %d", len(got), len(want))
	}
	if len(s.ByPodUID("uid-1")) != 1 {
		t.Fatalf("record of uid-1 lost: %v", s.All())
	}
	// Writes fail while the disk is full and work once there is room.
	extra := rec("/var/lib/kubelet/pods/px/volumes/kubernetes.io~csi/v/mount", "uid-x")
	if err := s.Put(extra); err == nil {
		t.Log("a put fit on the full filesystem")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(extra); err != nil {
		t.Fatalf("put after freeing space: %v", err)
	}
	s.Close()
	s, err = Open(recDir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if len(s.ByPodUID("uid-x")) != 1 || len(s.All()) != len(want)+1 {
		t.Fatalf("after reopen: %v", s.All())
	}
}

// A damaged journal on a full filesystem cannot be copied aside: it stays as
// it is, the only evidence, and is not compacted until a later Open has
// copied it.
func TestQuarantineOnFullFilesystem(t *testing.T) {
	dir := smallTmpfs(t, "4m")
	recDir := filepath.Join(dir, "records")
	if err := os.Mkdir(recDir, 0o700); err != nil {
		t.Fatal(err)
	}
	journal := filepath.Join(recDir, journalName)
	content := `{"op":"put","record":{"podUID":"u","targetPath":"/ok"}}` + "\n" + "not json\n"
	if err := os.WriteFile(journal, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for chunk := make([]byte, 4096); ; {
		if _, err := f.Write(chunk); err != nil {
			break
		}
	}
	f.Close()

	s, err := Open(recDir)
	if err != nil {
		t.Fatalf("Open of a damaged journal on a full filesystem: %v", err)
	}
	if q := s.Quarantined(); len(q) != 1 || q[0] != journal {
		t.Fatalf("quarantined %v, want the journal itself", q)
	}
	if got, _ := os.ReadFile(journal); string(got) != content {
		t.Fatalf("journal rewritten before it was copied: %q", got)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	// Enough churn to compact a healthy store: this one keeps its journal.
	for range compactSlack {
		if err := s.Put(rec("/churn", "c")); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete("/churn"); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := os.ReadFile(journal); !strings.HasPrefix(string(got), content) {
		t.Fatal("the damaged journal was compacted")
	}
	s.Close()
	s = open(t, recDir)
	q := s.Quarantined()
	if len(q) != 1 || q[0] == journal {
		t.Fatalf("after reopen with room: quarantined %v, want a copy", q)
	}
	if got, _ := os.ReadFile(q[0]); !strings.HasPrefix(string(got), content) {
		t.Fatalf("quarantine copy %q", got)
	}
	if got := targets(s.All()); strings.Join(got, ",") != "/ok" {
		t.Fatalf("records %v", got)
	}
}
