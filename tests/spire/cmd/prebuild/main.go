// Command prebuild builds spire-server and spire-agent into the SPIRE cache
// ahead of the interop test: `make test` runs it in the background at idle
// priority while the other suites run, and the test waits for it.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/csi-agent/csi-agent/tests/spire"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	cache, err := spire.CacheDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "spire-prebuild: "+format+"\n", args...) }
	server, _, took, err := spire.Build(ctx, filepath.Join("tools"), cache, logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	logf("%s ready (built in %s; 0s: it was cached)", filepath.Dir(server), took.Round(time.Second))
}
