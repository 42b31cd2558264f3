package peer

import (
	"errors"
	"net"
	"os"
	"testing"

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
