// Command csi-agent is a Kubernetes node agent that is both a CSI node plugin
// delivering the SPIFFE Workload API socket into pods and an attesting
// Workload API server, plus a small Workload API client.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/config"
)

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "dev"

const usageText = `csi-agent: CSI node plugin and attesting SPIFFE Workload API server

Usage:
  csi-agent run [flags]                 run the agent (csi-agent run -h for flags)
  csi-agent controller [flags]          run the cluster controller (csi-agent controller -h for flags)
  csi-agent fetch x509|jwt|bundles      fetch from the Workload API (built-in client)
  csi-agent validate-jwt                validate a JWT-SVID through the Workload API
  csi-agent healthcheck                 exit 0 when the Workload API socket serves
  csi-agent version                     print the version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "run":
		err = runAgent(ctx, args[1:], stderr)
	case "controller":
		err = runController(ctx, args[1:], stderr)
	case "fetch":
		err = fetch(ctx, args[1:], stdout, stderr)
	case "validate-jwt":
		err = validateJWT(ctx, args[1:], stdout, stderr)
	case "healthcheck":
		err = healthcheck(ctx, args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, version)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usageText)
	default:
		fmt.Fprintf(stderr, "unknown command %q\n\n%s", args[0], usageText)
		return 2
	}
	if err == flag.ErrHelp {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "csi-agent %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func runAgent(ctx context.Context, args []string, stderr io.Writer) error {
	var klogFlags *flag.FlagSet
	addKlog := func(fs *flag.FlagSet) { klog.InitFlags(fs); klogFlags = fs }
	cfg, err := config.FromArgs(args, os.Getenv, stderr, addKlog)
	if err != nil {
		return err
	}
	if err := applyLogging(cfg.Logging.Format, klogFlags); err != nil {
		return err
	}
	defer klog.Flush()
	opts := agentOptions{
		version: version,
		reload: func() (config.Config, error) {
			// Re-reading with the same arguments keeps flag overrides on top.
			return config.FromArgs(args, os.Getenv, io.Discard, registerKlogNames)
		},
	}
	if cfg.Dev {
		sock := cfg.WorkloadAPI.SocketPath()
		opts.started = func() {
			fmt.Fprintf(stderr, "\ncsi-agent is serving the Workload API (dev mode).\nIn another shell:\n  go run ./cmd/csi-agent fetch x509 --dev\nor, for any go-spiffe client:\n  export SPIFFE_ENDPOINT_SOCKET=unix://%s\n\n", sock)
		}
	}
	return runAgentConfig(ctx, cfg, opts)
}

// registerKlogNames accepts klog's flags on reload without re-initialising
// klog's global state.
func registerKlogNames(fs *flag.FlagSet) {
	tmp := flag.NewFlagSet("", flag.ContinueOnError)
	klog.InitFlags(tmp)
	tmp.VisitAll(func(f *flag.Flag) {
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			fs.Bool(f.Name, false, f.Usage)
			return
		}
		fs.String(f.Name, f.DefValue, f.Usage)
	})
}
