package csi

import (
	"strings"
	"testing"

	"github.com/csi-agent/csi-agent/internal/config"
	"github.com/csi-agent/csi-agent/internal/records"
)

// TestNewValidatesOptions: New fills in no defaults and rejects only what the
// driver cannot work with; which driver names are acceptable is the
// configuration's call.
func TestNewValidatesOptions(t *testing.T) {
	store, err := records.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ok := Options{
		DriverName:           config.DefaultDriverName,
		Version:              "1.2.3",
		NodeID:               "n",
		KubeletRootDir:       config.DefaultKubeletRootDir,
		WorkloadAPISocketDir: "/run/csi-agent",
		Records:              store,
	}
	d, err := New(ok)
	if err != nil {
		t.Fatal(err)
	}
	if d.name != ok.DriverName || d.version != ok.Version || d.nodeID != ok.NodeID || d.kubeletRoot != ok.KubeletRootDir || d.socketDir != ok.WorkloadAPISocketDir {
		t.Fatalf("driver %q %q %q %q %q from %+v", d.name, d.version, d.nodeID, d.kubeletRoot, d.socketDir, ok)
	}
	for _, tc := range []struct {
		name   string
		mutate func(*Options)
		want   string // error substring, "" when accepted
	}{
		{"no driver name", func(o *Options) { o.DriverName = "" }, "driver name is empty"},
		{"upper-case driver name: config's call", func(o *Options) { o.DriverName = "CSI.Spiffe.io" }, ""},
		{"no version", func(o *Options) { o.Version = "" }, "version is empty"},
		{"no node", func(o *Options) { o.NodeID = "" }, "node ID is empty"},
		{"node too long", func(o *Options) { o.NodeID = strings.Repeat("n", 257) }, "node ID"},
		{"node at the CSI limit", func(o *Options) { o.NodeID = strings.Repeat("n", 256) }, ""},
		{"no kubelet root", func(o *Options) { o.KubeletRootDir = "" }, "kubelet root dir is empty"},
		{"relative kubelet root", func(o *Options) { o.KubeletRootDir = "var/lib/kubelet" }, "not absolute"},
		{"no socket dir", func(o *Options) { o.WorkloadAPISocketDir = "" }, "socket dir"},
		{"relative socket dir", func(o *Options) { o.WorkloadAPISocketDir = "run" }, "not absolute"},
		{"no records", func(o *Options) { o.Records = nil }, "records"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.mutate(&o)
			_, err := New(o)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want error containing %q", err, tc.want)
			}
		})
	}
}
