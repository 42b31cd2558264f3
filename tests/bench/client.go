package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// seen is one X.509-SVID a stream received.
type seen struct {
	Serial   string `json:"s"`
	NotAfter int64  `json:"n"` // unix seconds
}

// clientReport is what a stream client process prints when asked.
type clientReport struct {
	UID       int      `json:"uid"`
	LatencyUS []int64  `json:"lat"`     // connect → first X.509-SVID, per stream
	Streams   [][]seen `json:"streams"` // every SVID each stream received, in order
	Errors    []string `json:"errors,omitempty"`
}

// runClient is the stream client process: it opens n streams, perConn on
// each connection, says "ready", records every SVID they receive and, on
// "report" from stdin (or at EOF), prints its report as one JSON line.
func runClient(sock string, n, perConn int) error {
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"))
	defer cancel()
	rep := clientReport{UID: os.Getuid(), LatencyUS: make([]int64, n), Streams: make([][]seen, n)}
	var (
		mu    sync.Mutex
		wg    sync.WaitGroup
		conns []*grpc.ClientConn
	)
	defer func() {
		cancel()
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()
	fail := func(err error) {
		mu.Lock()
		rep.Errors = append(rep.Errors, err.Error())
		mu.Unlock()
	}
	for i := range n {
		start := time.Now()
		if i%max(perConn, 1) == 0 {
			conn, err := dial(sock)
			if err != nil {
				return err
			}
			conns = append(conns, conn)
		}
		conn := conns[len(conns)-1]
		stream, err := workloadpb.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
		if err != nil {
			return fmt.Errorf("stream %d: %w", i, err)
		}
		first, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("stream %d: %w", i, err)
		}
		rep.LatencyUS[i] = time.Since(start).Microseconds()
		s, err := leafOf(first)
		if err != nil {
			return err
		}
		rep.Streams[i] = []seen{s}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				resp, err := stream.Recv()
				if err != nil {
					if ctx.Err() == nil {
						fail(fmt.Errorf("stream %d: %w", i, err))
					}
					return
				}
				s, err := leafOf(resp)
				if err != nil {
					fail(err)
					return
				}
				mu.Lock()
				rep.Streams[i] = append(rep.Streams[i], s)
				mu.Unlock()
			}
		}()
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() && in.Text() != "report" {
	}
	mu.Lock()
	defer mu.Unlock()
	return json.NewEncoder(os.Stdout).Encode(rep)
}

func leafOf(resp *workloadpb.X509SVIDResponse) (seen, error) {
	if len(resp.Svids) == 0 {
		return seen{}, fmt.Errorf("response without SVIDs")
	}
	certs, err := x509.ParseCertificates(resp.Svids[0].X509Svid)
	if err != nil {
		return seen{}, err
	}
	return seen{hex.EncodeToString(certs[0].SerialNumber.Bytes()), certs[0].NotAfter.Unix()}, nil
}

// clientProc is a running stream client, seen from the bench.
type clientProc struct {
	uid   int
	stdin io.WriteCloser
	out   *bufio.Reader
	wait  func() error
}

func (c *clientProc) report() (clientReport, error) {
	var rep clientReport
	if _, err := io.WriteString(c.stdin, "report\n"); err != nil {
		return rep, err
	}
	line, err := c.out.ReadBytes('\n')
	if err != nil {
		return rep, fmt.Errorf("client uid %d: %w", c.uid, err)
	}
	err = json.Unmarshal(line, &rep)
	return rep, err
}

func (c *clientProc) stop() {
	c.stdin.Close()
	_ = c.wait()
}
