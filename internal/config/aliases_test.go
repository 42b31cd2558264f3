package config

import (
	"io"
	"strings"
	"testing"
)

func TestSocketAliases(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       []string
		err        string // "" = valid
	}{
		{"none", "trustDomain: example.org", nil, ""},
		{"SPIRE's names", "workloadAPI: {socketName: spire-agent.sock, socketAliases: [socket, api.sock]}", []string{"socket", "api.sock"}, ""},
		{"the socket's own name", "workloadAPI: {socketName: api.sock, socketAliases: [api.sock]}", nil, "socketAliases[0]: \"api.sock\" is the socket's name"},
		{"twice", "workloadAPI: {socketAliases: [socket, socket]}", nil, "socketAliases[1]"},
		{"a path", "workloadAPI: {socketAliases: [../x]}", nil, "socketAliases[0]: must be a plain file name"},
		{"hidden", "workloadAPI: {socketAliases: [.x]}", nil, "not starting with a dot"},
		{"empty", "workloadAPI: {socketAliases: [\"\"]}", nil, "socketAliases[0]"},
		{"too long", "workloadAPI: {socketAliases: [" + strings.Repeat("a", 90) + "]}", nil, "Unix sockets allow 107"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.yaml))
			if err == nil {
				err = cfg.Validate()
			}
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				if strings.Join(cfg.WorkloadAPI.SocketAliases, ",") != strings.Join(tc.want, ",") {
					t.Fatalf("aliases %q, want %q", cfg.WorkloadAPI.SocketAliases, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("error %v, want one containing %q", err, tc.err)
			}
		})
	}
}

// The flag takes a comma-separated list, as the spiffe-csi drop-in passes it.
func TestSocketAliasesFlag(t *testing.T) {
	cfg, err := FromArgs([]string{"--workload-api-socket-name=spire-agent.sock", "--workload-api-socket-aliases=socket,api.sock"},
		func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.WorkloadAPI.SocketAliases, ","); got != "socket,api.sock" {
		t.Fatalf("aliases %q", got)
	}
}
