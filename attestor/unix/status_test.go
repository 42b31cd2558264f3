package unix

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func readSample(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "status", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseStatusSamples(t *testing.T) {
	// Real /proc/<pid>/status files captured on Linux 6.18.
	tests := []struct {
		file string
		want procStatus
	}{
		{"root.status", procStatus{state: 'R', uid: 0, gid: 0}},
		{"kthread.status", procStatus{state: 'S', uid: 0, gid: 0}},
		{"zombie.status", procStatus{state: 'Z', uid: 0, gid: 0}},
		{"user-groups.status", procStatus{state: 'R', uid: 1000, gid: 1000, groups: []uint32{4, 24, 27}}},
		// setpriv --ruid 1000 --euid 2000 --rgid 1001 --egid 2001: effective ids win.
		{"split-ids.status", procStatus{state: 'R', uid: 2000, gid: 2001}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			got, err := parseStatus([]byte(readSample(t, tt.file)))
			if err != nil {
				t.Fatalf("parseStatus: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("parseStatus = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseStatus(t *testing.T) {
	const base = "Name:\tx\nState:\tS (sleeping)\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 10 \n"
	tests := []struct {
		name    string
		in      string
		want    procStatus
		wantErr string
	}{
		{name: "minimal", in: base, want: procStatus{state: 'S', uid: 2, gid: 6, groups: []uint32{9, 10}}},
		{name: "no trailing newline", in: strings.TrimSuffix(base, "\n"), want: procStatus{state: 'S', uid: 2, gid: 6, groups: []uint32{9, 10}}},
		{name: "empty groups", in: strings.Replace(base, "9 10 ", " ", 1), want: procStatus{state: 'S', uid: 2, gid: 6}},
		{name: "max ids", in: strings.Replace(base, "1\t2\t3\t4", "4294967295\t4294967295\t4294967295\t4294967295", 1), want: procStatus{state: 'S', uid: 4294967295, gid: 6, groups: []uint32{9, 10}}},
		// The kernel escapes the name; were it not, a forged line must not count twice.
		{name: "name forging a Uid line", in: "Name:\tx\nUid:\t0\t0\t0\t0\n" + base[len("Name:\tx\n"):], wantErr: "duplicate Uid"},
		{name: "duplicate Gid", in: base + "Gid:\t0\t0\t0\t0\n", wantErr: "duplicate Gid"},
		{name: "duplicate Groups", in: base + "Groups:\t0\n", wantErr: "duplicate Groups"},
		{name: "duplicate State", in: base + "State:\tR (running)\n", wantErr: "duplicate State"},
		{name: "empty", in: "", wantErr: "no State"},
		{name: "no Uid", in: strings.Replace(base, "Uid:", "Xid:", 1), wantErr: "no Uid"},
		{name: "no Gid", in: strings.Replace(base, "Gid:", "Xid:", 1), wantErr: "no Gid"},
		{name: "no Groups", in: strings.Replace(base, "Groups:", "Xroups:", 1), wantErr: "no Groups"},
		{name: "three uids", in: strings.Replace(base, "1\t2\t3\t4", "1\t2\t3", 1), wantErr: "want 4 ids"},
		{name: "five uids", in: strings.Replace(base, "1\t2\t3\t4", "1\t2\t3\t4\t5", 1), wantErr: "want 4 ids"},
		{name: "negative uid", in: strings.Replace(base, "1\t2\t3\t4", "1\t-2\t3\t4", 1), wantErr: "malformed id"},
		{name: "uid overflow", in: strings.Replace(base, "1\t2\t3\t4", "1\t4294967296\t3\t4", 1), wantErr: "malformed id"},
		{name: "hex uid", in: strings.Replace(base, "1\t2\t3\t4", "1\t0x2\t3\t4", 1), wantErr: "malformed id"},
		{name: "signed gid", in: strings.Replace(base, "5\t6\t7\t8", "5\t+6\t7\t8", 1), wantErr: "malformed id"},
		{name: "bad group", in: strings.Replace(base, "9 10", "9 ten", 1), wantErr: "malformed id"},
		{name: "empty state", in: strings.Replace(base, "S (sleeping)", "", 1), wantErr: "malformed State"},
		{name: "key with space", in: strings.Replace(base, "Uid:", "Uid :", 1), wantErr: "no Uid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatus([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseStatus = %+v, %v; want error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseStatus: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("parseStatus = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// FuzzParseStatus: never panics; whatever the process is named, the ids come
// from the real lines and a forged line is refused, never believed.
func FuzzParseStatus(f *testing.F) {
	for _, name := range []string{"root.status", "kthread.status", "zombie.status", "user-groups.status", "split-ids.status"} {
		f.Add([]byte(readSample(f, name)), "cat")
	}
	f.Add([]byte("Uid:\t1\t2\t3\t4\n"), "x\nUid:\t0\t0\t0\t0")
	f.Add([]byte(""), "")
	f.Fuzz(func(t *testing.T, raw []byte, name string) {
		parseStatus(raw)

		in := "Name:\t" + name + "\nState:\tS (sleeping)\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9\n"
		st, err := parseStatus([]byte(in))
		if err != nil {
			return // a name that forges a line: refused
		}
		if st.uid != 2 || st.gid != 6 || len(st.groups) != 1 || st.groups[0] != 9 {
			t.Fatalf("name %q changed the result: %+v", name, st)
		}
	})
}

func TestParseIDNames(t *testing.T) {
	in := "root:x:0:0:root:/root:/bin/bash\n" +
		"# comment:x:5:5\n" +
		"+nis:x:6:6\n" +
		"-nis:x:7:7\n" +
		"toor:x:0:0::/root:/bin/sh\n" + // duplicate id: first wins
		":x:8:8\n" + // no name
		"short:x\n" +
		"bad:x:-1:0\n" +
		"big:x:4294967296:0\n" +
		"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n" +
		"\n" +
		"grp:x:100:alice,bob" // group format, no newline
	got := parseIDNames([]byte(in))
	want := map[uint32]string{0: "root", 65534: "nobody", 100: "grp"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parseIDNames = %v, want %v", got, want)
	}
}

func FuzzParseIDNames(f *testing.F) {
	f.Add([]byte("root:x:0:0:root:/root:/bin/bash\nnogroup:x:65534:\n"))
	f.Add([]byte("a:b:c\n::\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		for id, name := range parseIDNames(raw) {
			if name == "" || strings.ContainsAny(name, ":\n") {
				t.Fatalf("id %d has name %q", id, name)
			}
		}
	})
}
