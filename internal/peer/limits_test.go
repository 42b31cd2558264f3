package peer

import (
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
)

func TestLimits(t *testing.T) {
	type step struct {
		op   string // "open" (want ok), "refuse" (want ErrTooManyConnections), "close N", "entitle N"
		n    int
		call string // caller key for opens
	}
	for _, tc := range []struct {
		name   string
		limits Limits
		steps  []step
	}{
		{"total", Limits{Total: 2}, []step{{op: "open"}, {op: "open"}, {op: "refuse"}, {op: "close", n: 0}, {op: "open"}, {op: "refuse"}}},
		{"unproven keeps a reserve for entitled callers", Limits{Total: 3, Unproven: 2}, []step{
			{op: "open"}, {op: "open"}, {op: "refuse"}, // two idle connections use up the unproven pool
			{op: "entitle", n: 0}, {op: "open"}, // one is served an identity: room again
			{op: "entitle", n: 1}, {op: "entitle", n: 2}, {op: "refuse"}, // Total still holds
			{op: "close", n: 2}, {op: "open"},
		}},
		{"entitling twice counts once", Limits{Unproven: 1}, []step{{op: "open"}, {op: "entitle", n: 0}, {op: "entitle", n: 0}, {op: "open"}, {op: "refuse"}}},
		{"closing an entitled connection", Limits{Unproven: 1}, []step{{op: "open"}, {op: "entitle", n: 0}, {op: "close", n: 0}, {op: "open"}, {op: "refuse"}}},
		{"per caller", Limits{PerCaller: 2}, []step{
			{op: "open", call: "a"}, {op: "open", call: "a"}, {op: "refuse", call: "a"},
			{op: "open", call: "b"}, {op: "close", n: 0}, {op: "open", call: "a"}, {op: "refuse", call: "a"},
		}},
		{"no limits", Limits{}, []step{{op: "open"}, {op: "open"}, {op: "open"}, {op: "open"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var key string
			tc.limits.CallerKey = func(Info) string { return key }
			creds := Credentials(tc.limits)
			var conns []net.Conn
			var infos []Info
			t.Cleanup(func() {
				for _, c := range conns {
					c.Close()
				}
			})
			for i, st := range tc.steps {
				switch st.op {
				case "open", "refuse":
					key = st.call
					server, client := unixPair(t)
					t.Cleanup(func() { client.Close(); server.Close() })
					conn, ai, err := creds.ServerHandshake(server)
					if st.op == "refuse" {
						if !errors.Is(err, ErrTooManyConnections) {
							t.Fatalf("step %d: handshake = %v, want ErrTooManyConnections", i, err)
						}
						continue
					}
					if err != nil {
						t.Fatalf("step %d: handshake: %v", i, err)
					}
					conns = append(conns, conn)
					infos = append(infos, ai.(AuthInfo).Info)
				case "close":
					if err := conns[st.n].Close(); err != nil {
						t.Fatal(err)
					}
					conns[st.n].Close() // twice: released once
				case "entitle":
					infos[st.n].MarkEntitled()
				}
			}
		})
	}
}

// A refused handshake releases the process handle it took.
func TestRefusedHandshakeReleasesHandle(t *testing.T) {
	creds := Credentials(Limits{Total: 1})
	s1, c1 := unixPair(t)
	defer c1.Close()
	conn, _, err := creds.ServerHandshake(s1)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	s2, c2 := unixPair(t)
	defer c2.Close()
	defer s2.Close()
	before := openFDs(t)
	var ai credentials.AuthInfo
	if _, ai, err = creds.ServerHandshake(s2); !errors.Is(err, ErrTooManyConnections) || ai != nil {
		t.Fatalf("second handshake = %v, %v", ai, err)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d open fds after the refusal, %d before: the process handle leaked", after, before)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// When the connections without an identity are at their limit, a new
// caller's connection is let in by closing the oldest one of the caller that
// holds the most; that caller itself cannot push its way in.
func TestUnprovenEviction(t *testing.T) {
	var key string
	creds := Credentials(Limits{Unproven: 3, CallerKey: func(Info) string { return key }})
	type held struct {
		client net.Conn
		info   Info
	}
	open := func(caller string) (held, error) {
		key = caller
		server, client := unixPair(t)
		t.Cleanup(func() { client.Close(); server.Close() })
		conn, ai, err := creds.ServerHandshake(server)
		if err != nil {
			return held{}, err
		}
		t.Cleanup(func() { conn.Close() })
		return held{client: client, info: ai.(AuthInfo).Info}, nil
	}
	closed := func(h held) bool {
		_ = h.client.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := h.client.Read(make([]byte, 1))
		return errors.Is(err, io.EOF)
	}
	var flood []held
	for range 3 {
		h, err := open("hostile")
		if err != nil {
			t.Fatal(err)
		}
		flood = append(flood, h)
	}
	if _, err := open("hostile"); !errors.Is(err, ErrTooManyConnections) {
		t.Fatalf("the flooding caller's fourth connection: %v, want refused", err)
	}
	pod, err := open("pod")
	if err != nil {
		t.Fatalf("a new caller was kept out by the flood: %v", err)
	}
	if !closed(flood[0]) {
		t.Fatal("the flood's oldest connection was not closed to make room")
	}
	pod.info.MarkEntitled()
	// The pod's connection is proven and leaves the pool: room for one more
	// without closing anything; after that the flood pays again, until it
	// holds no more than anyone else.
	if _, err := open("other"); err != nil {
		t.Fatalf("a second new caller: %v", err)
	}
	if _, err := open("third"); err != nil {
		t.Fatalf("a third new caller: %v", err)
	}
	if !closed(flood[1]) {
		t.Fatal("the flood's next oldest connection was not closed")
	}
	if _, err := open("fourth"); !errors.Is(err, ErrTooManyConnections) {
		t.Fatalf("with the pool shared evenly, a new caller: %v, want refused", err)
	}
}

// Each refusal at the handshake tells Limits.Refused once, with the limit
// that refused it; admissions and evictions tell it nothing.
func TestRefusedReasons(t *testing.T) {
	for _, tc := range []struct {
		name    string
		limits  Limits
		callers []string // one connection each, in order
		want    []string // reasons told, in order
	}{
		{"total", Limits{Total: 2}, []string{"a", "b", "c"}, []string{RefusedTotal}},
		{"per caller", Limits{PerCaller: 1}, []string{"a", "b", "a", "a"}, []string{RefusedCaller, RefusedCaller}},
		{"unattested", Limits{Unproven: 2}, []string{"a", "b", "c"}, []string{RefusedUnattested}},
		// "a" holds two of three: "c" evicts one of them, no refusal.
		{"eviction is no refusal", Limits{Unproven: 3}, []string{"a", "a", "b", "c"}, nil},
		{"no limits", Limits{}, []string{"a", "a", "a"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var key string
			var told []string
			tc.limits.CallerKey = func(Info) string { return key }
			tc.limits.Refused = func(reason string, info Info, err error) {
				if !errors.Is(err, ErrTooManyConnections) || info.PID != int32(os.Getpid()) {
					t.Errorf("Refused(%q, pid %d, %v): want ErrTooManyConnections from this process", reason, info.PID, err)
				}
				told = append(told, reason)
			}
			creds := Credentials(tc.limits)
			for _, c := range tc.callers {
				key = c
				server, client := unixPair(t)
				t.Cleanup(func() { client.Close(); server.Close() })
				if conn, _, err := creds.ServerHandshake(server); err == nil {
					t.Cleanup(func() { conn.Close() })
				}
			}
			if strings.Join(told, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("Refused told %q, want %q", told, tc.want)
			}
			for _, r := range told {
				if !slices.Contains(Refusals(), r) {
					t.Errorf("reason %q is not in Refusals()", r)
				}
			}
		})
	}
}
