package records

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

func rec(target, uid string) Record {
	return Record{VolumeID: "vol-" + target, PodUID: uid, PodNamespace: "ns", PodName: "p", ServiceAccount: "sa", TargetPath: target, PublishedAt: time.Unix(1700000000, 0).UTC()}
}

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func targets(rs []Record) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.TargetPath)
	}
	sort.Strings(out)
	return out
}

func TestPutDeleteSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	for _, r := range []Record{rec("/a", "u1"), rec("/b", "u1"), rec("/c", "u2")} {
		if err := s.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Delete("/b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("/never"); err != nil {
		t.Fatalf("deleting an absent record: %v", err)
	}
	// Replacing a target moves it to the new pod.
	if err := s.Put(rec("/c", "u3")); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s2 := open(t, dir)
	if got := targets(s2.All()); strings.Join(got, ",") != "/a,/c" {
		t.Fatalf("after reopen: %v", got)
	}
	if got := targets(s2.ByPodUID("u1")); strings.Join(got, ",") != "/a" {
		t.Errorf("u1: %v", got)
	}
	if got := s2.ByPodUID("u2"); len(got) != 0 {
		t.Errorf("u2 still has %v", got)
	}
	if r, ok := s2.ByTarget("/c"); !ok || r.PodUID != "u3" || !r.PublishedAt.Equal(rec("/c", "u3").PublishedAt) {
		t.Errorf("/c: %+v %v", r, ok)
	}
	fi, err := os.Stat(filepath.Join(dir, journalName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("journal mode %v", fi.Mode().Perm())
	}
}

func TestTornLastLineDropped(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	if err := s.Put(rec("/a", "u1")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// A crash in the middle of appending the next line.
	f, err := os.OpenFile(filepath.Join(dir, journalName), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"op":"put","record":{"podUID":"u2","targetPa`)
	f.Close()

	s2 := open(t, dir)
	if got := targets(s2.All()); strings.Join(got, ",") != "/a" {
		t.Fatalf("got %v", got)
	}
	// The torn tail is gone after compaction, so new appends are whole lines.
	if err := s2.Put(rec("/b", "u2")); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if got := targets(open(t, dir).All()); strings.Join(got, ",") != "/a,/b" {
		t.Fatalf("after append past a torn tail: %v", got)
	}
}

// A whole line that does not parse may have been acknowledged: Open keeps
// every good record, copies the journal aside before compacting it, and
// reports the damage, wherever the line is. (It used to refuse to open over
// a bad middle line, which cost every pod on the node its identity, and to
// drop a bad last line silently, which lost that pod's record.)
func TestDamagedLineQuarantined(t *testing.T) {
	good := `{"op":"put","record":{"podUID":"u","targetPath":"/ok"}}` + "\n"
	later := `{"op":"put","record":{"podUID":"v","targetPath":"/later"}}` + "\n"
	bads := map[string]string{
		"garbage line":  "not json\n",
		"unknown op":    `{"op":"frob"}` + "\n",
		"put no record": `{"op":"put"}` + "\n",
		"record no uid": `{"op":"put","record":{"targetPath":"/a"}}` + "\n",
		"del no target": `{"op":"del"}` + "\n",
		"cut short":     `{"op":"put","rec` + "\n",
		"zeros":         "\x00\x00\x00\n",
	}
	for name, bad := range bads {
		for _, where := range []string{"middle", "last"} {
			t.Run(name+" "+where, func(t *testing.T) {
				dir := t.TempDir()
				path := filepath.Join(dir, journalName)
				content, want, wantAfter := good+bad+later, "/later,/ok", "/later,/new,/ok"
				if where == "last" {
					content, want, wantAfter = good+bad, "/ok", "/new,/ok"
				}
				if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
				s, err := Open(dir)
				if err != nil {
					t.Fatalf("damaged journal refused: %v", err)
				}
				if got := strings.Join(targets(s.All()), ","); got != want {
					t.Errorf("records %s, want %s", got, want)
				}
				q := s.Quarantined()
				if len(q) != 1 || !strings.HasPrefix(filepath.Base(q[0]), quarantinePrefix) {
					t.Fatalf("quarantined %v", q)
				}
				if got, err := os.ReadFile(q[0]); err != nil || string(got) != content {
					t.Fatalf("quarantine copy %q, %v; want the journal as it was", got, err)
				}
				if fi, err := os.Stat(q[0]); err != nil || fi.Mode().Perm() != 0o600 {
					t.Errorf("quarantine copy mode: %v %v", fi, err)
				}
				// The store works, and stays damaged across a restart: the
				// compacted journal no longer shows the bad line, the copy does.
				if err := s.Put(rec("/new", "w")); err != nil {
					t.Fatal(err)
				}
				s.Close()
				s2 := open(t, dir)
				if got := s2.Quarantined(); len(got) != 1 || got[0] != q[0] {
					t.Errorf("after reopen: quarantined %v, want %v", got, q)
				}
				if got := strings.Join(targets(s2.All()), ","); got != wantAfter {
					t.Errorf("after reopen: records %s", got)
				}
				if _, err := Load(dir); err != nil {
					t.Errorf("Load of the compacted journal: %v", err)
				}
			})
		}
	}
}

func TestLoadReportsDamage(t *testing.T) {
	dir := t.TempDir()
	content := "not json\n" + `{"op":"put","record":{"podUID":"u","targetPath":"/ok"}}` + "\n"
	if err := os.WriteFile(filepath.Join(dir, journalName), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Fatalf("Load of a damaged journal: %v", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, journalName)); string(got) != content {
		t.Error("Load changed the journal")
	}
}

func TestDamagedLastLineDropped(t *testing.T) {
	// A last line without its newline was never acknowledged: drop it and
	// go on, with no damage reported. A last line with its newline may have
	// been: keep the good records and report the damage.
	good := `{"op":"put","record":{"podUID":"u","targetPath":"/ok"}}` + "\n"
	for _, tc := range []struct {
		tail    string
		damaged bool
	}{
		{`{"op":"put","rec` + "\n", true},
		{"\x00\x00\x00\n", true},
		{`{"op":"frob"}`, false},
		{`{"op":"put","record":{"podUID":"u2","targetPath":"/torn"}}`, false},
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, journalName), []byte(good+tc.tail), 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			t.Fatalf("tail %q: %v", tc.tail, err)
		}
		if got := targets(s.All()); strings.Join(got, ",") != "/ok" {
			t.Errorf("tail %q: records %v", tc.tail, got)
		}
		if got := len(s.Quarantined()) > 0; got != tc.damaged {
			t.Errorf("tail %q: damaged %v, want %v", tc.tail, got, tc.damaged)
		}
		s.Close()
	}
}

func TestInvalidRecordRejected(t *testing.T) {
	s := open(t, t.TempDir())
	if err := s.Put(Record{PodUID: "u"}); err == nil {
		t.Error("record without target accepted")
	}
	if err := s.Put(Record{TargetPath: "/a"}); err == nil {
		t.Error("record without pod UID accepted")
	}
	if len(s.All()) != 0 {
		t.Error("invalid record stored")
	}
}

func TestCompaction(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	for i := 0; i < 3*compactSlack; i++ {
		target := fmt.Sprintf("/t%d", i%10)
		if err := s.Put(rec(target, "u")); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(target); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Put(rec("/kept", "u")); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(data), "\n"); n > compactSlack+2 {
		t.Fatalf("journal has %d lines for 1 record: not compacted", n)
	}
	s.Close()
	if got := targets(open(t, dir).All()); strings.Join(got, ",") != "/kept" {
		t.Fatalf("after compaction: %v", got)
	}
}

func TestConcurrentUse(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				target := fmt.Sprintf("/w%d/%d", w, i)
				if err := s.Put(rec(target, fmt.Sprintf("pod%d", w))); err != nil {
					t.Error(err)
				}
				_ = s.ByPodUID(fmt.Sprintf("pod%d", w))
				if i%2 == 0 {
					if err := s.Delete(target); err != nil {
						t.Error(err)
					}
				}
			}
		}(w)
	}
	wg.Wait()
	s.Close()
	s2 := open(t, dir)
	if n := len(s2.All()); n != 80 {
		t.Fatalf("%d records after reopen, want 80", n)
	}
	if n := len(s2.ByPodUID("pod3")); n != 10 {
		t.Fatalf("pod3 has %d records, want 10", n)
	}
}

func TestClosedStoreRefusesWrites(t *testing.T) {
	s := open(t, t.TempDir())
	s.Close()
	if err := s.Put(rec("/a", "u")); err == nil {
		t.Fatal("write to a closed store accepted")
	}
}

func BenchmarkPutDelete(b *testing.B) {
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	r := rec("/bench", "u")
	for i := 0; i < b.N; i++ {
		if err := s.Put(r); err != nil {
			b.Fatal(err)
		}
		if err := s.Delete(r.TargetPath); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSecondOpenRefusedLoadAllowed(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	if err := s.Put(rec("/a", "u")); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Open: %v", err)
	}
	all, err := Load(dir)
	if err != nil || len(all) != 1 {
		t.Fatalf("Load: %v %v", all, err)
	}
	// The writer keeps working after a Load.
	if err := s.Put(rec("/b", "u")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if got := targets(open(t, dir).All()); strings.Join(got, ",") != "/a,/b" {
		t.Fatalf("after close and reopen: %v", got)
	}
}

// The operation that crosses the compaction threshold must be on disk after
// the rewrite, whether it replaces a record (a re-publish) or removes one.
// (A put of a new target adds a line and a live record: it never crosses.)
func TestCompactionKeepsTheOperationThatTriggeredIt(t *testing.T) {
	for _, last := range []string{"replace", "delete"} {
		t.Run(last, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, dir)
			if err := s.Put(rec("/kept", "old-pod")); err != nil {
				t.Fatal(err)
			}
			// Each put/delete pair widens the gap between journal lines and
			// live records by two; stop right at the threshold.
			for s.lines-len(s.byTarget) < compactSlack {
				if err := s.Put(rec("/churn", "u")); err != nil {
					t.Fatal(err)
				}
				if err := s.Delete("/churn"); err != nil {
					t.Fatal(err)
				}
			}
			before := s.lines
			switch last {
			case "replace":
				if err := s.Put(rec("/kept", "new-pod")); err != nil {
					t.Fatal(err)
				}
			case "delete":
				if err := s.Delete("/kept"); err != nil {
					t.Fatal(err)
				}
			}
			if s.lines >= before {
				t.Fatalf("no compaction happened (%d lines, was %d)", s.lines, before)
			}
			onDisk, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case last == "replace" && (len(onDisk) != 1 || onDisk[0].PodUID != "new-pod"):
				t.Fatalf("on disk after the re-publish: %+v", onDisk)
			case last == "delete" && len(onDisk) != 0:
				t.Fatalf("deleted record back on disk: %+v", onDisk)
			}
		})
	}
}

// Whatever the journal holds, replay keeps only valid records, in step
// with their pod index, counts every whole line, and reports each whole
// line that does not parse.
func FuzzParseJournal(f *testing.F) {
	good := `{"op":"put","record":{"podUID":"u","targetPath":"/ok"}}` + "\n"
	for _, seed := range []string{"", good, good + "not json\n", "\x00\n" + good, good + `{"op":"del","target":"/ok"}` + "\n", good + `{"op":"put","rec`} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := newStore("")
		s.parse("fuzz", data)
		whole := bytes.LastIndexByte(data, '\n') + 1
		if s.size != int64(whole) || s.lines != bytes.Count(data, []byte("\n")) {
			t.Fatalf("size %d lines %d, want %d and %d", s.size, s.lines, whole, bytes.Count(data, []byte("\n")))
		}
		n := 0
		for uid, targets := range s.byPod {
			for target := range targets {
				if r, ok := s.byTarget[target]; !ok || r.PodUID != uid {
					t.Fatalf("pod index %s -> %s out of step: %+v", uid, target, r)
				}
				n++
			}
		}
		for _, r := range s.byTarget {
			if r.validate() != nil {
				t.Fatalf("invalid record kept: %+v", r)
			}
		}
		if n != len(s.byTarget) {
			t.Fatalf("pod index holds %d targets, records %d", n, len(s.byTarget))
		}
		for _, b := range s.bad {
			if b.n < 1 || b.n > s.lines || b.err == nil {
				t.Fatalf("bad line %+v of %d", b, s.lines)
			}
		}
	})
}
