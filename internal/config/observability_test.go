package config

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMetricsAndLoggingSettings(t *testing.T) {
	for _, tc := range []struct {
		name       string
		args       []string
		yaml       string
		wantAddr   string
		wantFormat string
		wantErr    string
	}{
		{name: "defaults: off, text", wantFormat: LogFormatText},
		{name: "flags", args: []string{"--metrics-addr", "0.0.0.0:9808", "--logging-format", "json"}, wantAddr: "0.0.0.0:9808", wantFormat: LogFormatJSON},
		{name: "file", yaml: "metrics:\n  addr: 127.0.0.1:9808\nlogging:\n  format: json\n", wantAddr: "127.0.0.1:9808", wantFormat: LogFormatJSON},
		{name: "flag over file", args: []string{"--logging-format", "text"}, yaml: "logging:\n  format: json\n", wantFormat: LogFormatText},
		{name: "port only", args: []string{"--metrics-addr", ":9808"}, wantAddr: ":9808", wantFormat: LogFormatText},
		{name: "unknown format", args: []string{"--logging-format", "xml"}, wantErr: "logging.format"},
		{name: "no port", args: []string{"--metrics-addr", "127.0.0.1"}, wantErr: "metrics.addr"},
		{name: "empty port", args: []string{"--metrics-addr", "127.0.0.1:"}, wantErr: "metrics.addr"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.yaml != "" {
				file := filepath.Join(t.TempDir(), "config.yaml")
				if err := os.WriteFile(file, []byte(tc.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append([]string{"--config", file}, args...)
			}
			cfg, err := FromArgs(args, func(string) string { return "" }, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Metrics.Addr != tc.wantAddr || cfg.Logging.Format != tc.wantFormat {
				t.Fatalf("metrics.addr %q logging.format %q, want %q %q", cfg.Metrics.Addr, cfg.Logging.Format, tc.wantAddr, tc.wantFormat)
			}
		})
	}
}
