// Command e2e-images builds the e2e's images (csi-agent, the go-spiffe test
// workload, pause) from source into one docker-archive, without a registry
// or a Docker daemon: `kind load image-archive` and `ctr images import` take it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

func main() {
	repo := flag.String("repo", "../..", "repository root")
	out := flag.String("out", "images.tar", "archive to write")
	flag.Parse()
	wd, err := os.Getwd()
	if err == nil {
		var abs string
		if abs, err = filepath.Abs(*repo); err == nil {
			err = framework.BuildImages(context.Background(), abs, wd, *out)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e-images:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s, %s, %s\n", *out, framework.AgentImage, framework.WorkloadImage, framework.PauseImage)
}
