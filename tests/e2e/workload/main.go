// Command workload is the e2e test workload: a go-spiffe client that reports
// what the Workload API gives it as one JSON line per event on stdout, which
// the e2e reads back through the pod log.
//
//	workload watch [--probe-write DIR]   stream X.509 contexts until SIGTERM
//	workload fetch                       one FetchX509Context, then exit (1 on error)
//	workload sleep DURATION              for postStart hooks
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/status"
)

// Event is one line of output; the e2e decodes the same struct.
type Event struct {
	Event string    `json:"event"` // start, x509, error, write
	Time  time.Time `json:"time"`
	// x509
	Seq      int      `json:"seq,omitempty"`
	IDs      []string `json:"ids,omitempty"`
	Serials  []string `json:"serials,omitempty"`
	NotAfter []string `json:"notAfter,omitempty"`
	Verified bool     `json:"verified,omitempty"`
	// error, write
	Code  string `json:"code,omitempty"`
	Error string `json:"error,omitempty"`
	Errno string `json:"errno,omitempty"`
}

func emit(e Event) {
	e.Time = time.Now()
	b, _ := json.Marshal(e)
	fmt.Println(string(b))
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: workload watch|fetch|sleep")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "watch":
		err = watch(ctx, os.Args[2:])
	case "fetch":
		err = fetch(ctx)
	case "podcert":
		err = podCert(ctx, os.Args[2:])
	case "mtls-serve":
		err = mtlsServe(ctx, os.Args[2:])
	case "sleep":
		var d time.Duration
		if len(os.Args) > 2 {
			d, err = time.ParseDuration(os.Args[2])
		}
		if err == nil {
			select {
			case <-time.After(d):
			case <-ctx.Done():
			}
		}
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "workload:", err)
		os.Exit(1)
	}
}

func watch(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	probe := fs.String("probe-write", "", "try to create a file in this directory and report the outcome")
	if err := fs.Parse(args); err != nil {
		return err
	}
	emit(Event{Event: "start"})
	if *probe != "" {
		probeWrite(*probe)
	}
	client, err := workloadapi.New(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	w := &watcher{}
	err = client.WatchX509Context(ctx, w)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func probeWrite(dir string) {
	err := os.WriteFile(filepath.Join(dir, "written-by-workload"), []byte("x"), 0o644)
	e := Event{Event: "write"}
	if err != nil {
		e.Error = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			e.Errno = errnoName(errno)
		}
	}
	emit(e)
}

func errnoName(errno syscall.Errno) string {
	switch errno {
	case syscall.EROFS:
		return "EROFS"
	case syscall.EACCES:
		return "EACCES"
	case syscall.EPERM:
		return "EPERM"
	}
	return fmt.Sprintf("errno %d", int(errno))
}

type watcher struct{ seq int }

func (w *watcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	w.seq++
	e := Event{Event: "x509", Seq: w.seq, Verified: len(c.SVIDs) > 0}
	for _, s := range c.SVIDs {
		e.IDs = append(e.IDs, s.ID.String())
		e.Serials = append(e.Serials, s.Certificates[0].SerialNumber.Text(16))
		e.NotAfter = append(e.NotAfter, s.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
		if err := verify(s, c); err != nil {
			e.Verified = false
			e.Error = err.Error()
		}
	}
	emit(e)
}

// verify checks the chain against the bundle that came with it and that the
// verified ID is the one the SVID claims.
func verify(s *x509svid.SVID, c *workloadapi.X509Context) error {
	id, _, err := x509svid.Verify(s.Certificates, c.Bundles)
	if err != nil {
		return fmt.Errorf("%s: %w", s.ID, err)
	}
	if id != s.ID {
		return fmt.Errorf("chain verifies as %s, SVID claims %s", id, s.ID)
	}
	return nil
}

func (w *watcher) OnX509ContextWatchError(err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	emit(Event{Event: "error", Code: status.Code(err).String(), Error: err.Error()})
}

func fetch(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	c, err := workloadapi.FetchX509Context(ctx)
	if err != nil {
		emit(Event{Event: "error", Code: status.Code(err).String(), Error: err.Error()})
		return err
	}
	(&watcher{}).OnX509ContextUpdate(c)
	return nil
}
