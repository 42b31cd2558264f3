package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/metadata"
)

// streamsConfig is the -mode streams run.
type streamsConfig struct {
	n          int           // first-SVID samples
	rssStreams int           // open streams for the RSS phase
	rotStreams int           // open streams for the rotation phase
	identities int           // client processes, one uid (identity) each
	ttl        time.Duration // X.509-SVID lifetime in the rotation phase
	rotations  int           // half lives measured
	perConn    int           // streams per connection in the rotation phase; 0: as few as the fd limit allows
	rounds     int
	floor      bool // add canned gRPC servers to the RSS phase
}

// firstUID is the uid of the first stream client; client i runs as
// firstUID+i, group benchGID.
const firstUID = 20000

type rssResult struct {
	p50, p99, p50Open time.Duration
	idle, rss, hwm    int64
	// From a SIGHUP that wakes every stream once: what one re-attestation
	// reads (procfs) and costs.
	readsPerWake, bytesPerWake, cpuPerWake float64
}

// rssPhase: first-SVID latency on a warm cache, then RSS with m streams
// open (one connection each, from this process, all one identity), then a
// rules reload that makes every stream re-attest once, to learn what one
// re-attestation costs in read syscalls and CPU.
func rssPhase(start func() (*agent, error), n, m int) (rssResult, error) {
	var r rssResult
	a, err := start()
	if err != nil {
		return r, err
	}
	defer a.stop()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")
	for range 50 {
		if _, err := firstSVIDRaw(ctx, a.sock); err != nil {
			return r, err
		}
	}
	lat, err := sample(n, func() (time.Duration, error) { return firstSVIDRaw(ctx, a.sock) })
	if err != nil {
		return r, err
	}
	r.p50, r.p99 = pctDur(lat, 50), pctDur(lat, 99)
	r.idle = rssKiB(a.pid)
	closeStreams, err := openStreams(ctx, a.sock, m)
	if err != nil {
		return r, err
	}
	defer closeStreams()
	time.Sleep(2 * time.Second)
	s0, err := sampleProc(a.pid)
	if err != nil {
		return r, err
	}
	r.rss, r.hwm = s0.rss, s0.hwm
	lat, err = sample(n/4, func() (time.Duration, error) { return firstSVIDRaw(ctx, a.sock) })
	if err != nil {
		return r, err
	}
	r.p50Open = pctDur(lat, 50)

	c0, err := sampleProc(a.pid)
	if err != nil {
		return r, err
	}
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		return r, err
	}
	time.Sleep(3 * time.Second)
	c1, err := sampleProc(a.pid)
	if err != nil {
		return r, err
	}
	r.readsPerWake = float64(c1.syscr-c0.syscr) / float64(m)
	r.bytesPerWake = float64(c1.rchar-c0.rchar) / float64(m)
	r.cpuPerWake = float64((c1.cpu - c0.cpu).Microseconds()) / float64(m)
	return r, nil
}

type rotationResult struct {
	open          time.Duration // to open every stream
	window        time.Duration
	halfLives     float64 // window / (ttl/2): rotations of every identity expected
	cpu           time.Duration
	syscr, rchar  int64
	renewals      int // distinct SVIDs minted in the window, all identities
	deliveries    int // SVIDs received by streams in the window
	missed        int // rotations some stream of the identity did not receive
	streamErrors  int
	rssEnd, hwm   int64
	errorExamples []string
}

// rotationPhase opens streams streams spread over identities client
// processes (one uid each), lets the SVIDs rotate for rotations half lives
// and measures the agent meanwhile; every stream must receive every
// rotation of its identity.
func rotationPhase(bin, self string, cfg streamsConfig) (rotationResult, error) {
	var r rotationResult
	streams, identities, ttl := cfg.rotStreams, cfg.identities, cfg.ttl
	a, err := startAgent(bin, true, "--x509-svid-ttl", ttl.String())
	if err != nil {
		return r, err
	}
	defer a.stop()

	per := streams / identities
	clients := make([]*clientProc, identities)
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.stop()
			}
		}
	}()
	start := time.Now()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sem  = make(chan struct{}, 4)
	)
	for i := range identities {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := spawnClient(self, a.sock, firstUID+i, per, cfg.perConn)
			mu.Lock()
			defer mu.Unlock()
			clients[i] = c
			if err != nil {
				errs = append(errs, err)
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		return r, errs[0]
	}
	r.open = time.Since(start)
	time.Sleep(2 * time.Second)

	s0, err := sampleProc(a.pid)
	if err != nil {
		return r, err
	}
	time.Sleep(time.Duration(cfg.rotations) * ttl / 2)
	s1, err := sampleProc(a.pid)
	if err != nil {
		return r, err
	}
	r.window = s1.at.Sub(s0.at)
	r.halfLives = r.window.Seconds() / (ttl / 2).Seconds()
	r.cpu, r.syscr, r.rchar = s1.cpu-s0.cpu, s1.syscr-s0.syscr, s1.rchar-s0.rchar
	r.rssEnd, r.hwm = s1.rss, s1.hwm

	// Rotations made just before the end are still being delivered: every
	// stream must have each one minted by the end of the window a little
	// later, when it reports.
	time.Sleep(3 * time.Second)
	for _, c := range clients {
		rep, err := c.report()
		if err != nil {
			return r, err
		}
		checkRotations(&r, rep, ttl, s0.at, s1.at)
	}
	return r, nil
}

// checkRotations adds one identity's streams to r. The SVIDs any stream
// of the identity received, ordered by expiry, are its rotations; each
// stream must have received every one minted in the window from its first
// on, consecutive ones
// must be half a lifetime apart (else a rotation reached nobody), and the
// last must be younger than half a lifetime at the end of the window.
func checkRotations(r *rotationResult, rep clientReport, ttl time.Duration, from, to time.Time) {
	minted := func(s seen) time.Time { return time.Unix(s.NotAfter, 0).Add(-ttl) }
	inWindow := func(s seen) bool { t := minted(s); return !t.Before(from) && !t.After(to) }
	notAfter := map[string]int64{}
	for _, st := range rep.Streams {
		for _, s := range st {
			notAfter[s.Serial] = s.NotAfter
		}
	}
	all := make([]seen, 0, len(notAfter))
	for serial, na := range notAfter {
		all = append(all, seen{serial, na})
	}
	slices.SortFunc(all, func(a, b seen) int { return int(a.NotAfter - b.NotAfter) })
	for _, s := range all {
		if inWindow(s) {
			r.renewals++
		}
	}
	for i := 1; i < len(all); i++ {
		if gap := time.Duration(all[i].NotAfter-all[i-1].NotAfter) * time.Second; gap > ttl*3/4 {
			r.missed++
			r.errorExamples = append(r.errorExamples, fmt.Sprintf("uid %d: no stream received a rotation between SVIDs %s apart", rep.UID, gap))
		}
	}
	if len(all) == 0 || minted(all[len(all)-1]).Before(to.Add(-ttl/2-5*time.Second)) {
		r.missed++
		r.errorExamples = append(r.errorExamples, fmt.Sprintf("uid %d: the last rotation before the end reached no stream", rep.UID))
	}
	for i, st := range rep.Streams {
		got := map[string]bool{}
		for _, s := range st {
			got[s.Serial] = true
			if inWindow(s) && s.Serial != st[0].Serial {
				r.deliveries++
			}
		}
		if len(st) == 0 {
			continue
		}
		for _, s := range all {
			if s.NotAfter > st[0].NotAfter && !minted(s).After(to) && !got[s.Serial] {
				r.missed++
				r.errorExamples = append(r.errorExamples, fmt.Sprintf("uid %d stream %d: missed SVID %s", rep.UID, i, s.Serial))
			}
		}
	}
	r.streamErrors += len(rep.Errors)
	r.errorExamples = append(r.errorExamples, rep.Errors...)
}

// spawnClient starts a stream client process as uid (group benchGID) and
// waits until its streams are open.
func spawnClient(self, sock string, uid, streams, perConn int) (*clientProc, error) {
	cmd := exec.Command(self, "-client", "-sock", sock, "-client-streams", strconv.Itoa(streams), "-client-per-conn", strconv.Itoa(perConn))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: benchGID}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &clientProc{uid: uid, stdin: stdin, out: bufio.NewReaderSize(stdout, 1<<20), wait: cmd.Wait}
	ready := make(chan error, 1)
	go func() {
		line, err := c.out.ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(2 * time.Minute):
		err = fmt.Errorf("not ready after 2m")
	}
	if err != nil {
		_ = cmd.Process.Kill()
		c.stop()
		return nil, fmt.Errorf("client uid %d: %w: %s", uid, err, stderr.String())
	}
	return c, nil
}

// installSelf copies this executable where the client uids can run it.
func installSelf() (path string, cleanup func(), err error) {
	exe, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	dir, err := os.MkdirTemp("", "csi-agent-bench-client-")
	if err != nil {
		return "", nil, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	if err := os.Chmod(dir, 0o755); err != nil {
		cleanup()
		return "", nil, err
	}
	src, err := os.Open(exe)
	if err != nil {
		cleanup()
		return "", nil, err
	}
	defer src.Close()
	path = filepath.Join(dir, "bench")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o755)
	if err == nil {
		_, err = io.Copy(dst, src)
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		cleanup()
		return "", nil, err
	}
	return path, cleanup, nil
}

// runStreams runs the RSS and rotation phases for every binary, alternating
// their order from round to round, and prints the numbers side by side.
func runStreams(bins []namedBin, cfg streamsConfig) error {
	limit, err := raiseFileLimit()
	if err != nil {
		return err
	}
	// Two descriptors per connection in the agent, and some to spare.
	conns := int(limit-1024) / 2
	if cfg.rssStreams > conns {
		return fmt.Errorf("-rss-streams %d: RLIMIT_NOFILE %d allows %d connections", cfg.rssStreams, limit, conns)
	}
	if cfg.perConn == 0 {
		cfg.perConn = (cfg.rotStreams + conns - 1) / conns
	}
	self, cleanup, err := installSelf()
	if err != nil {
		return err
	}
	defer cleanup()
	type column struct {
		name string
		rss  rssResult
		rot  *rotationResult
	}
	var cols []column
	if cfg.floor {
		for _, tuned := range []bool{false, true} {
			name := "bare gRPC, default buffers"
			if tuned {
				name = "bare gRPC, agent's buffers"
			}
			fmt.Fprintf(os.Stderr, "%s: RSS phase, %d streams\n", name, cfg.rssStreams)
			rss, err := rssPhase(func() (*agent, error) { return startCanned(self, tuned) }, cfg.n, cfg.rssStreams)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			cols = append(cols, column{name: name, rss: rss})
		}
	}
	for round := range cfg.rounds {
		order := slices.Clone(bins)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, b := range order {
			fmt.Fprintf(os.Stderr, "round %d %s: RSS phase, %d streams\n", round+1, b.name, cfg.rssStreams)
			rss, err := rssPhase(func() (*agent, error) { return startAgent(b.path, true) }, cfg.n, cfg.rssStreams)
			if err != nil {
				return fmt.Errorf("%s: %w", b.name, err)
			}
			col := column{name: fmt.Sprintf("%s (round %d)", b.name, round+1), rss: rss}
			if cfg.rotStreams == 0 {
				cols = append(cols, col)
				continue
			}
			fmt.Fprintf(os.Stderr, "round %d %s: rotation phase, %d streams over %d identities, TTL %s\n", round+1, b.name, cfg.rotStreams, cfg.identities, cfg.ttl)
			rot, err := rotationPhase(b.path, self, cfg)
			if err != nil {
				return fmt.Errorf("%s: %w", b.name, err)
			}
			for i, e := range rot.errorExamples {
				if i == 5 {
					fmt.Fprintf(os.Stderr, "  ... %d more\n", len(rot.errorExamples)-i)
					break
				}
				fmt.Fprintln(os.Stderr, "  "+e)
			}
			col.rot = &rot
			cols = append(cols, col)
		}
	}

	row := func(label string, f func(c column) string) {
		fmt.Printf("| %s |", label)
		for _, c := range cols {
			fmt.Printf(" %s |", f(c))
		}
		fmt.Println()
	}
	fmt.Printf("| metric |")
	for _, c := range cols {
		fmt.Printf(" %s |", c.name)
	}
	fmt.Printf("\n|---|%s\n", strings.Repeat("---|", len(cols)))
	ms := func(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d.Microseconds())/1000) }
	row(fmt.Sprintf("new connection → first X.509-SVID p50 / p99 (n=%d, warm cache)", cfg.n), func(c column) string {
		return ms(c.rss.p50) + " / " + ms(c.rss.p99)
	})
	row(fmt.Sprintf("same p50 with %d streams open", cfg.rssStreams), func(c column) string { return ms(c.rss.p50Open) })
	row("agent RSS idle", func(c column) string { return mib(c.rss.idle) })
	row(fmt.Sprintf("agent RSS / VmHWM with %d open X.509 streams", cfg.rssStreams), func(c column) string {
		return mib(c.rss.rss) + " / " + mib(c.rss.hwm)
	})
	row("per re-attestation (SIGHUP wakes every stream once): read syscalls / bytes read / agent CPU", func(c column) string {
		return fmt.Sprintf("%.1f / %.0f / %.0f µs", c.rss.readsPerWake, c.rss.bytesPerWake, c.rss.cpuPerWake)
	})
	if cfg.rotStreams == 0 {
		return nil
	}
	rotRow := func(label string, f func(c column) string) {
		row(label, func(c column) string {
			if c.rot == nil {
				return "–"
			}
			return f(c)
		})
	}
	rotRow(fmt.Sprintf("time to open %d streams over %d uids, %d per connection", cfg.rotStreams, cfg.identities, cfg.perConn), func(c column) string {
		return fmt.Sprintf("%.1f s", c.rot.open.Seconds())
	})
	rotRow("window (half lives = rotations of each identity)", func(c column) string {
		return fmt.Sprintf("%.0f s (%.2f)", c.rot.window.Seconds(), c.rot.halfLives)
	})
	rotRow("SVIDs renewed in the window / delivered to streams", func(c column) string {
		return fmt.Sprintf("%d / %d", c.rot.renewals, c.rot.deliveries)
	})
	rotRow("agent CPU per rotation (all identities once)", func(c column) string {
		return fmt.Sprintf("%.2f s", c.rot.cpu.Seconds()/c.rot.halfLives)
	})
	rotRow("read syscalls / bytes read per rotation", func(c column) string {
		return fmt.Sprintf("%.0f / %.1f MB", float64(c.rot.syscr)/c.rot.halfLives, float64(c.rot.rchar)/c.rot.halfLives/1e6)
	})
	// A re-attestation reads /proc/<pid>/status, about 1.4 kB; a delivery
	// reads only the client's small flow-control frames.
	rotRow("≈ attestations per rotation (bytes read / bytes per re-attestation)", func(c column) string {
		if c.rss.bytesPerWake <= 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", float64(c.rot.rchar)/c.rot.halfLives/c.rss.bytesPerWake)
	})
	rotRow("missed rotations / stream errors", func(c column) string {
		return fmt.Sprintf("%d / %d", c.rot.missed, c.rot.streamErrors)
	})
	rotRow(fmt.Sprintf("agent RSS / VmHWM with %d streams", cfg.rotStreams), func(c column) string {
		return mib(c.rot.rssEnd) + " / " + mib(c.rot.hwm)
	})
	return nil
}

func pctDur(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}
