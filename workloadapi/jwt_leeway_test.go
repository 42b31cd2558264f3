package workloadapi

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/csi-agent/csi-agent/internal/ca"
	"github.com/csi-agent/csi-agent/internal/rules"
)

// A JWT-SVID validates for JWTExpiryLeeway past its exp, not go-jose's
// default minute.
func TestValidateJWTSVIDExpiryLeeway(t *testing.T) {
	a := startAgent(t, agentConfig{svids: []rules.SVID{uidRule("/me", strconv.Itoa(os.Getuid()))}})
	td := spiffeid.RequireTrustDomainFromString("example.org")
	c := rawClient(t, a.socket)
	for _, tc := range []struct {
		name    string
		expired time.Duration // how long ago the token expired
		want    codes.Code
	}{
		{"within the leeway", JWTExpiryLeeway / 2, codes.OK},
		{"past the leeway, inside go-jose's minute", JWTExpiryLeeway + 20*time.Second, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The same CA state, on a clock in the past: a token that
			// expired tc.expired ago, signed with the agent's own key.
			const ttl = 10 * time.Second
			past := clocktesting.NewFakeClock(time.Now().Add(-tc.expired - ttl))
			minter, err := ca.New(context.Background(), ca.Options{TrustDomain: td, StateDir: filepath.Join(a.stateDir, "ca"), Clock: past,
				X509SVIDTTL: time.Hour, JWTSVIDTTL: ttl, IntermediateTTL: 24 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			token, _, err := minter.MintJWTSVID(context.Background(), spiffeid.RequireFromPath(td, "/me"), []string{"aud"})
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.ValidateJWTSVID(withHeader(context.Background()), &workloadpb.ValidateJWTSVIDRequest{Audience: "aud", Svid: token})
			if status.Code(err) != tc.want {
				t.Fatalf("ValidateJWTSVID = %v, want %v", err, tc.want)
			}
			if tc.want != codes.OK && !strings.Contains(err.Error(), "expired") {
				t.Fatalf("refusal does not say why: %v", err)
			}
		})
	}
}
