package peer

import (
	"fmt"
	"os"
	"testing"
)

// Real lines from /proc/<pid>/stat, and ones a workload can provoke by
// naming itself (prctl PR_SET_NAME takes any bytes).
const (
	statCat    = "7824 (cat) R 7819 7819 2649 0 -1 4194304 101 0 0 0 0 0 0 0 20 0 1 0 21883 3133440 418 18446744073709551615 94745433534464 94745433554345 140732352596128 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94745433570352 94745433571968 94746425663488 140732352604670 140732352604690 140732352604690 140732352606187 0\n"
	statZombie = "7878 (sh) Z 7876 7869 2649 0 -1 4227148 22 0 0 0 0 0 0 0 20 0 1 0 22093 0 0 18446744073709551615 0 0 0 0 0 0 0 6 65536 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
)

func statWithComm(comm, state string, start uint64) string {
	return fmt.Sprintf("42 (%s) %s 1 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 %d 3133440 418\n", comm, state, start)
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		wantState byte
		wantStart uint64
		wantErr   bool
	}{
		{name: "running", in: statCat, wantState: 'R', wantStart: 21883},
		{name: "zombie", in: statZombie, wantState: 'Z', wantStart: 22093},
		{name: "no trailing newline", in: statCat[:len(statCat)-1], wantState: 'R', wantStart: 21883},
		{name: "comm with spaces", in: statWithComm("a b c", "S", 7), wantState: 'S', wantStart: 7},
		{name: "comm with parens", in: statWithComm(") R 1 2 3 (", "S", 99), wantState: 'S', wantStart: 99},
		{name: "comm faking fields", in: statWithComm("x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5", "S", 6), wantState: 'S', wantStart: 6},
		{name: "comm with newline", in: statWithComm("a\n1 (b) Z", "S", 8), wantState: 'S', wantStart: 8},
		{name: "empty comm", in: statWithComm("", "I", 2), wantState: 'I', wantStart: 2},
		{name: "empty", in: "", wantErr: true},
		{name: "no paren", in: "42 cat R 1 2 3", wantErr: true},
		{name: "truncated", in: "42 (cat) R 1 2 3\n", wantErr: true},
		{name: "nothing after comm", in: "42 (cat)", wantErr: true},
		{name: "long state", in: statWithComm("c", "RR", 7), wantErr: true},
		{name: "start not a number", in: "42 (c) S 1 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 x1 3\n", wantErr: true},
		{name: "start negative", in: "42 (c) S 1 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 -1 3\n", wantErr: true},
		{name: "start overflows", in: "42 (c) S 1 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 18446744073709551616 3\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, start, err := parseStat([]byte(tt.in))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("parseStat(%q) = %c %d, want error", tt.in, state, start)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseStat: %v", err)
			}
			if state != tt.wantState || start != tt.wantStart {
				t.Fatalf("parseStat = %c %d, want %c %d", state, start, tt.wantState, tt.wantStart)
			}
		})
	}
}

func TestParseStatOwnProcess(t *testing.T) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	state, start, err := parseStat(b)
	if err != nil {
		t.Fatalf("parseStat(%q): %v", b, err)
	}
	if state == 'Z' || state == 'X' || start == 0 {
		t.Fatalf("parseStat = %c %d", state, start)
	}
}

// FuzzParseStat: no input panics, and whatever a process names itself, the
// state and start time come out right.
func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statCat), "cat")
	f.Add([]byte(statZombie), ") Z 1 2 (")
	f.Add([]byte(""), "")
	f.Add([]byte("1 ()"), "a\nb")
	f.Fuzz(func(t *testing.T, raw []byte, comm string) {
		parseStat(raw)
		state, start, err := parseStat([]byte(statWithComm(comm, "S", 123)))
		if err != nil || state != 'S' || start != 123 {
			t.Fatalf("comm %q: parseStat = %c %d %v", comm, state, start, err)
		}
	})
}
