// Package podcert runs the PodCertificateRequest signer (internal/podcert)
// in-process against a real kube-apiserver v1.37 (etcd and kube-apiserver
// on loopback, no kubelet): requests are created as the node, the way the
// kubelet does, so node-restriction admission and the status validation of
// the API server judge what the signer writes. As root (etcd, ports).
//
//	go test -count=1 ./podcert/    (in tests/e2e; PODCERT_PODS and PODCERT_QPS size the latency case)
package podcert

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/testutil"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

// Ports of this suite's control plane (CLUSTER.md: the podcert helper's).
const (
	apiServerPort = 18443
	etcdPort      = 24379
)

var baseDir = flag.String("podcert.base", "/var/lib/csi-agent-podcert-test", "directory of the control plane (removed afterwards)")

var suite struct {
	cp  *framework.ControlPlane
	err error
}

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 {
		os.Exit(m.Run()) // every case calls requireControlPlane: testutil.RequireRoot
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s podcert: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	home, _ := os.UserHomeDir()
	suite.cp, suite.err = framework.StartControlPlane(ctx, framework.ControlPlaneOptions{
		Base: *baseDir, APIServerPort: apiServerPort, EtcdPort: etcdPort,
		ToolsDir: filepath.Join("..", "tools"), CacheDir: filepath.Join(home, ".cache", "csi-agent-e2e"), Logf: logf,
	})
	cancel()
	code := m.Run()
	if suite.cp != nil {
		if err := suite.cp.Stop(); err != nil {
			logf("stop: %v", err)
		}
	}
	os.Exit(code)
}

func requireControlPlane(t *testing.T) *framework.ControlPlane {
	t.Helper()
	testutil.RequireRoot(t) // etcd, kube-apiserver
	if suite.err != nil {
		t.Fatalf("control plane: %v", suite.err)
	}
	return suite.cp
}
