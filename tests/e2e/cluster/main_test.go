// Package cluster runs csi-agent's cluster mode against a real
// kube-apiserver (etcd and kube-apiserver on loopback, no kubelet): two
// controller replicas and two node agents as host processes, with the
// checks of issue 8 (`make cluster-e2e`, part of `make test`; as root).
package cluster

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/csi-agent/csi-agent/internal/testutil"
	"github.com/csi-agent/csi-agent/tests/e2e/framework"
)

var (
	cleanupOnly = flag.Bool("cluster.cleanup", false, "only tear down what an earlier run left under the base directory, then exit")
	baseDir     = flag.String("cluster.base", framework.EnvOr("CSI_AGENT_CLUSTER_BASE", "/var/lib/csi-agent-cluster-test"), "directory of the control plane and agents (removed afterwards)")
	artifacts   = flag.String("cluster.artifacts", framework.EnvOr("CSI_AGENT_CLUSTER_ARTIFACTS", filepath.Join(os.TempDir(), "csi-agent-cluster-artifacts")), "where logs go when the run fails")
)

// Ports of this suite's control plane (CLUSTER.md): apiserver, etcd (+1, +2).
const (
	apiServerPort = 19443
	etcdPort      = 25379
)

var suite struct {
	cp       *framework.ControlPlane
	setupErr error // the control plane
	env      *env
	envErr   error // the controllers and agents
	teardown sync.Once
}

func TestMain(m *testing.M) {
	flag.Parse()
	logf := framework.Logger("cluster")
	if *cleanupOnly {
		if err := framework.Cleanup(*baseDir, *artifacts, logf); err != nil {
			logf("cleanup: %v", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if os.Geteuid() != 0 {
		os.Exit(m.Run()) // every case calls testutil.RequireRoot
	}
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	suite.setupErr = setup(ctx, logf)
	cancel()
	framework.OnInterrupt(logf, func() { teardown(true, logf) })
	if suite.setupErr != nil {
		logf("setup failed after %.1fs: %v", time.Since(t0).Seconds(), suite.setupErr)
	} else {
		logf("ready in %.1fs", time.Since(t0).Seconds())
	}
	code := m.Run()
	teardown(code != 0 || suite.setupErr != nil || suite.envErr != nil, logf)
	logf("total %.1fs", time.Since(t0).Seconds())
	os.Exit(code)
}

func setup(ctx context.Context, logf func(string, ...any)) error {
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	cp, err := framework.StartControlPlane(ctx, framework.ControlPlaneOptions{
		Base:          *baseDir,
		APIServerPort: apiServerPort,
		EtcdPort:      etcdPort,
		ToolsDir:      filepath.Join(wd, "..", "tools"),
		CacheDir:      framework.CacheDir(),
		Logf:          logf,
	})
	suite.cp = cp
	if err != nil {
		return err
	}
	dir := filepath.Join(*baseDir, "cluster")
	suite.env, suite.envErr = newEnv(ctx, cp, filepath.Join(wd, "..", "..", ".."), dir, logf)
	if suite.envErr != nil {
		logf("cluster mode did not come up: %v", suite.envErr)
	}
	return nil
}

func teardown(failed bool, logf func(string, ...any)) {
	suite.teardown.Do(func() {
		if suite.cp == nil {
			return
		}
		if failed {
			if err := suite.cp.SaveLogs(*artifacts); err != nil {
				logf("teardown: %v", err)
			} else {
				logf("teardown: logs saved in %s", *artifacts)
			}
		}
		if err := suite.cp.Stop(); err != nil {
			logf("teardown: %v", err)
		}
	})
}

// needCluster is the first line of every case.
func needCluster(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
	if suite.setupErr != nil {
		t.Fatalf("setup failed: %v", suite.setupErr)
	}
}
