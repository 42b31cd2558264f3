package config

import (
	"io"
	"strings"
	"testing"
)

// The kubelet edge: verified by default, and the token never goes to an
// unverified kubelet without the second, explicit opt-in.
func TestKubeletVerification(t *testing.T) {
	const base = "nodeName: node-a\ncsi: {socket: /p/csi.sock}\n"
	for _, tc := range []struct {
		name, kubelet string
		wantErr       string // "" valid
		wantCA        string
		wantSkip      bool
		wantToken     string
	}{
		{"default verifies with the cluster CA", "{}", "", DefaultKubeletCAFile, false, DefaultTokenFile},
		{"a self-signed kubelet pinned", "{caFile: /var/lib/kubelet/pki/kubelet.crt}", "", "/var/lib/kubelet/pki/kubelet.crt", false, DefaultTokenFile},
		{"system roots asked for", "{caFile: ''}", "", "", false, DefaultTokenFile},
		{"skip-verify with the token is refused", "{insecureSkipVerify: true}", "kubernetes.kubelet.insecureSkipVerify: the token would go", "", true, ""},
		{"skip-verify with an explicit token is refused", "{insecureSkipVerify: true, tokenFile: /t}", "kubernetes.kubelet.insecureSkipVerify: the token would go", "", true, ""},
		{"skip-verify and the token, both asked for", "{insecureSkipVerify: true, sendTokenUnverified: true}", "", "", true, DefaultTokenFile},
		{"skip-verify with a client certificate", "{insecureSkipVerify: true, clientCertFile: /c, clientKeyFile: /k}", "", "", true, ""},
		{"skip-verify anonymous", "{insecureSkipVerify: true, anonymous: true}", "", "", true, ""},
		{"skip-verify and a CA", "{insecureSkipVerify: true, sendTokenUnverified: true, caFile: /ca}", "kubernetes.kubelet.insecureSkipVerify: cannot be combined with caFile", "", true, ""},
		{"token-unverified alone means nothing", "{sendTokenUnverified: true}", "kubernetes.kubelet.sendTokenUnverified", "", false, ""},
		{"token-unverified on the read-only port", "{readOnlyPort: 10255, insecureSkipVerify: true, sendTokenUnverified: true}", "kubernetes.kubelet.sendTokenUnverified", "", true, ""},
		{"read-only port drops the default CA", "{readOnlyPort: 10255}", "", "", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(base + "kubernetes: {kubelet: " + tc.kubelet + "}"))
			if err != nil {
				t.Fatal(err)
			}
			err = cfg.Validate()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Validate = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Validate: %v", err)
			}
			k := cfg.KubeletConfig()
			if k.CAFile != tc.wantCA || k.InsecureSkipVerify != tc.wantSkip || k.TokenFile != tc.wantToken {
				t.Fatalf("KubeletConfig = %+v, want CA %q, skip-verify %v, token %q", k, tc.wantCA, tc.wantSkip, tc.wantToken)
			}
		})
	}
}

func TestKubeletSendTokenUnverifiedFlag(t *testing.T) {
	cfg, err := FromArgs([]string{"--node-name=node-a", "--kubernetes", "--cross-check=off", "--kubelet-insecure-skip-verify", "--kubelet-send-token-unverified"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromArgs([]string{"--node-name=node-a", "--kubernetes", "--cross-check=off", "--kubelet-insecure-skip-verify"}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "sendTokenUnverified") {
		t.Fatalf("skip-verify alone: err = %v, want the sendTokenUnverified hint", err)
	}
	if k := cfg.KubeletConfig(); !k.InsecureSkipVerify || !k.SendTokenUnverified || k.CAFile != "" {
		t.Fatalf("KubeletConfig = %+v", k)
	}
}
