package main

import (
	"context"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/csi-agent/csi-agent/internal/config"
)

// clientFlags are shared by the client commands.
type clientFlags struct {
	socket  string
	dev     bool
	timeout time.Duration
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.socket, "socket", "", "Workload API address, unix:///path (default $SPIFFE_ENDPOINT_SOCKET, then the agent's default socket)")
	fs.BoolVar(&c.dev, "dev", false, "talk to an agent started with run --dev")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "give up after this long")
}

// addr picks the Workload API address the way go-spiffe users expect.
func (c *clientFlags) addr() string {
	switch {
	case c.socket != "" && strings.Contains(c.socket, "://"):
		return c.socket
	case c.socket != "":
		return "unix://" + c.socket
	case c.dev:
		return "unix://" + config.DevSocketPath(os.Getenv)
	case os.Getenv("SPIFFE_ENDPOINT_SOCKET") != "":
		return os.Getenv("SPIFFE_ENDPOINT_SOCKET")
	}
	return "unix://" + filepath.Join(config.DefaultSocketDir, config.DefaultSocketName)
}

func fetch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New("fetch what? x509, jwt or bundles")
	}
	kind := args[0]
	fs := flag.NewFlagSet("fetch "+kind, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf clientFlags
	cf.register(fs)
	out := fs.String("out", "", "write PEM files (svid.pem, svid_key.pem, bundle.pem) into this directory")
	var audiences multiFlag
	fs.Var(&audiences, "audience", "JWT audience (repeatable; required for jwt)")
	spiffeID := fs.String("spiffe-id", "", "jwt: only this SPIFFE ID")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(cf.addr()))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", cf.addr(), err)
	}
	defer client.Close()

	switch kind {
	case "x509":
		x509ctx, err := client.FetchX509Context(ctx)
		if err != nil {
			return err
		}
		for _, svid := range x509ctx.SVIDs {
			fmt.Fprintf(stdout, "spiffe_id=%s hint=%s expires=%s\n", svid.ID, svid.Hint, svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
		}
		if *out != "" && len(x509ctx.SVIDs) > 0 {
			return writeX509(*out, x509ctx.SVIDs[0], x509ctx.Bundles.Bundles())
		}
	case "jwt":
		if len(audiences) == 0 {
			return errors.New("--audience is required")
		}
		params := jwtsvid.Params{Audience: audiences[0], ExtraAudiences: audiences[1:]}
		if *spiffeID != "" {
			id, err := parseID(*spiffeID)
			if err != nil {
				return err
			}
			params.Subject = id
		}
		svids, err := client.FetchJWTSVIDs(ctx, params)
		if err != nil {
			return err
		}
		for _, s := range svids {
			fmt.Fprintf(stdout, "spiffe_id=%s expires=%s\n%s\n", s.ID, s.Expiry.UTC().Format(time.RFC3339), s.Marshal())
		}
	case "bundles":
		bundles, err := client.FetchX509Bundles(ctx)
		if err != nil {
			return err
		}
		for _, b := range bundles.Bundles() {
			fmt.Fprintf(stdout, "trust_domain=%s x509_authorities=%d\n", b.TrustDomain(), len(b.X509Authorities()))
		}
		jwt, err := client.FetchJWTBundles(ctx)
		if err != nil {
			return err
		}
		for _, b := range jwt.Bundles() {
			fmt.Fprintf(stdout, "trust_domain=%s jwt_authorities=%d\n", b.TrustDomain(), len(b.JWTAuthorities()))
		}
		if *out != "" {
			return writeBundles(*out, bundles.Bundles())
		}
	default:
		return fmt.Errorf("unknown kind %q: want x509, jwt or bundles", kind)
	}
	return nil
}

func writeX509(dir string, svid *x509svid.SVID, bundles []*x509bundle.Bundle) error {
	certs, key, err := svid.Marshal()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "svid.pem"), certs, 0o644); err != nil {
		return err
	}
	// WriteFile keeps the mode of an existing file; a key must never inherit
	// a readable one.
	keyFile := filepath.Join(dir, "svid_key.pem")
	if err := os.Remove(keyFile); err != nil && !os.IsNotExist(err) {
		return err
	}
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		return err
	}
	return writeBundles(dir, bundles)
}

func writeBundles(dir string, bundles []*x509bundle.Bundle) error {
	var b []byte
	for _, bundle := range bundles {
		for _, c := range bundle.X509Authorities() {
			b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "bundle.pem"), b, 0o644)
}

func validateJWT(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("validate-jwt", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf clientFlags
	cf.register(fs)
	audience := fs.String("audience", "", "expected audience (required)")
	token := fs.String("token", "", "the JWT-SVID (required; - reads standard input)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *audience == "" || *token == "" {
		return errors.New("--audience and --token are required")
	}
	if *token == "-" {
		b, err := io.ReadAll(os.Stdin)
		if err != nil {
			return err
		}
		*token = strings.TrimSpace(string(b))
	}
	ctx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(cf.addr()))
	if err != nil {
		return err
	}
	defer client.Close()
	svid, err := client.ValidateJWTSVID(ctx, *token, *audience)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "valid spiffe_id=%s expires=%s\n", svid.ID, svid.Expiry.UTC().Format(time.RFC3339))
	return nil
}

func healthcheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf clientFlags
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	conn, err := grpc.NewClient(cf.addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("not serving: %s", resp.Status)
	}
	fmt.Fprintln(stdout, "serving")
	return nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func parseID(s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("--spiffe-id: %w", err)
	}
	return id, nil
}
