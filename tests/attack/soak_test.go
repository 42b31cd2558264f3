package attack

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// soakEnv sets the soak's length (a Go duration); without it the soak does
// not run. `make soak` sets 30m.
const soakEnv = "CSI_AGENT_SOAK"

// TestSoak holds 1,000 X.509 streams with a rotation every minute while a
// hostile caller floods the agent in bursts, under the 256 MiB cgroup. No
// entitled stream may ever hold an expired SVID, and the agent's
// descriptors, threads and memory must stay flat.
func TestSoak(t *testing.T) {
	length, err := time.ParseDuration(os.Getenv(soakEnv))
	if err != nil {
		t.Skipf("set %s=30m to soak", soakEnv)
	}
	testutil.RequireRoot(t)
	a := startAgentWith(t, "ca: {x509SVIDTTL: 2m}\n")

	const streams, perConn = 1000, 16
	type holder struct {
		mu       sync.Mutex
		notAfter time.Time
		serial   string
		updates  int
	}
	holders := make([]*holder, streams)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var broken atomic.Int64
	var wg sync.WaitGroup
	var conns []*grpc.ClientConn
	for i := range streams {
		if i%perConn == 0 {
			cc, err := dial(a.socket)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, cc)
			defer cc.Close()
		}
		h := &holder{}
		holders[i] = h
		client := workloadpb.NewSpiffeWorkloadAPIClient(conns[len(conns)-1])
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := client.FetchX509SVID(withHeader(ctx), &workloadpb.X509SVIDRequest{})
			if err != nil {
				broken.Add(1)
				return
			}
			for {
				resp, err := s.Recv()
				if err != nil {
					if ctx.Err() == nil {
						broken.Add(1)
					}
					return
				}
				leaf, err := x509.ParseCertificate(firstDER(resp.Svids[0].X509Svid))
				if err != nil {
					broken.Add(1)
					return
				}
				h.mu.Lock()
				h.notAfter, h.serial = leaf.NotAfter, leaf.SerialNumber.String()
				h.updates++
				h.mu.Unlock()
			}
		}()
	}

	type sample struct {
		at                    time.Duration
		rss, fds, threads     int64
		serials, expired, min int
	}
	var samples []sample
	start := time.Now()
	take := func() sample {
		s := sample{at: time.Since(start).Round(time.Second), min: 1 << 30}
		s.rss, s.threads = procStatus(a.cmd.Process.Pid)
		s.fds = countFDs(a.cmd.Process.Pid)
		seen := map[string]bool{}
		now := time.Now()
		for _, h := range holders {
			h.mu.Lock()
			if !h.notAfter.After(now) {
				s.expired++
			}
			seen[h.serial] = true
			s.min = min(s.min, h.updates)
			h.mu.Unlock()
		}
		s.serials = len(seen)
		return s
	}
	time.Sleep(10 * time.Second) // streams open, first SVIDs in
	samples = append(samples, take())
	for burst := 0; time.Since(start) < length; burst++ {
		// A hostile burst: idle connections and denied calls from a user
		// with no identity, then quiet.
		idle := a.attack(t, nobodyUID, "idle-connections", 3000)
		flood := a.attack(t, otherUID, "denied-flood", 5000)
		time.Sleep(5 * time.Second)
		idle.stop()
		flood.stop()
		time.Sleep(max(0, min(25*time.Second, length-time.Since(start))))
		s := take()
		samples = append(samples, s)
		if s.expired > 0 {
			t.Errorf("at %v, %d entitled streams held an expired SVID", s.at, s.expired)
		}
		if n := a.cg.ooms(t); n != 0 {
			t.Fatalf("at %v the kernel killed %d processes of the agent's cgroup", s.at, n)
		}
	}
	cancel()
	for _, cc := range conns {
		cc.Close()
	}
	wg.Wait()
	if n := broken.Load(); n > 0 {
		t.Errorf("%d entitled streams broke during the soak", n)
	}

	// The baseline is the first sample after a burst: the agent has grown
	// to its working size by then.
	first, last := samples[min(1, len(samples)-1)], samples[len(samples)-1]
	rotations := int(length / time.Minute)
	if last.min < rotations-1 {
		t.Errorf("a stream got %d SVID updates in %v; every stream should get about %d (one per rotation)", last.min, length, rotations)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "| time | agent RSS MiB | FDs | threads | streams with an expired SVID | fewest updates on a stream |\n|---|---|---|---|---|---|\n")
	for _, s := range samples {
		fmt.Fprintf(&b, "| %v | %.1f | %d | %d | %d | %d |\n", s.at, float64(s.rss)/1024, s.fds, s.threads, s.expired, s.min)
	}
	t.Logf("soak %v, %d streams, X.509 TTL 2m (rotation each minute), hostile bursts every 30 s; cgroup peak %d MiB\n%s",
		length, streams, a.cg.peak()>>20, b.String())
	// Flat: what a steady agent holds at the end is what it held at the start,
	// give or take the garbage collector's rhythm.
	if last.fds > first.fds+64 {
		t.Errorf("descriptors grew from %d to %d", first.fds, last.fds)
	}
	if last.threads > first.threads+16 {
		t.Errorf("threads grew from %d to %d", first.threads, last.threads)
	}
	if last.rss > first.rss*3/2+16<<10 {
		t.Errorf("RSS grew from %d KiB to %d KiB", first.rss, last.rss)
	}
}

func firstDER(chain []byte) []byte {
	// A DER SEQUENCE with a long-form length: 0x30 0x82 <len16>.
	if len(chain) < 4 || chain[0] != 0x30 || chain[1] != 0x82 {
		return chain
	}
	n := int(chain[2])<<8 | int(chain[3])
	return chain[:min(len(chain), 4+n)]
}

// procStatus reads VmRSS (KiB) and Threads of pid.
func procStatus(pid int) (rss, threads int64) {
	data, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		switch k {
		case "VmRSS":
			rss = n
		case "Threads":
			threads = n
		}
	}
	return rss, threads
}

func countFDs(pid int) int64 {
	entries, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	return int64(len(entries))
}
