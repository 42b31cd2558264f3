// Package csi is csi-agent's CSI node plugin: it mounts the Workload API
// socket directory read-only into pods that ask for it with a CSI ephemeral
// inline volume, records who got it (the Kubernetes attestor cross-checks
// callers against those records), and registers itself with the kubelet.
//
// The gRPC methods are a thin layer: request validation, target path checks
// and the mount logic are plain functions, and errors become gRPC codes only
// at the edge.
package csi

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/csi-agent/csi-agent/internal/records"
)

// maxNodeIDLen is the CSI limit for node_id.
const maxNodeIDLen = 256

// Options configure a Driver. Defaults and policy (which driver names are
// acceptable) belong to the configuration; New rejects only values the
// driver cannot work with.
type Options struct {
	// DriverName is the CSI driver name; Version its vendor version. Both
	// are required: GetPluginInfo must answer them.
	DriverName, Version string
	// NodeID is this node's name, as NodeGetInfo answers it.
	NodeID string
	// KubeletRootDir is the kubelet's --root-dir, absolute.
	KubeletRootDir string
	// WorkloadAPISocketDir is the directory bind-mounted into pods.
	WorkloadAPISocketDir string
	// Records is where every publish is recorded before it is answered.
	Records *records.Store
	// Mounter is the seam to the kernel's mounts; nil means NewMounter().
	Mounter Mounter
	// Ready reports whether the Workload API serves (Probe); nil means always.
	Ready func() bool
	// Observe, if set, is told of every NodePublishVolume ("publish") and
	// NodeUnpublishVolume ("unpublish"): its error and duration (metrics).
	Observe func(op string, err error, d time.Duration)
}

// Driver serves the CSI Identity and Node services.
type Driver struct {
	name, version, nodeID string
	kubeletRoot           string
	socketDir             string
	records               *records.Store
	mounter               Mounter
	ready                 func() bool
	observe               func(op string, err error, d time.Duration)

	// Seams for tests.
	now   func() time.Time
	hooks testHooks

	// One mutation at a time keeps the mount table and the records in step;
	// each mutation is a few syscalls and one fsync.
	mu sync.Mutex
}

// testHooks let tests stop the process at the points a crash can hit.
type testHooks struct {
	afterMount  func(target string)
	afterRecord func(target string)
}

// New checks opts and returns a Driver.
func New(opts Options) (*Driver, error) {
	switch {
	case opts.DriverName == "":
		return nil, errors.New("driver name is empty")
	case opts.Version == "":
		return nil, errors.New("version is empty")
	case opts.NodeID == "":
		return nil, errors.New("node ID is empty")
	case len(opts.NodeID) > maxNodeIDLen:
		return nil, fmt.Errorf("node ID is longer than %d bytes", maxNodeIDLen)
	case opts.KubeletRootDir == "":
		return nil, errors.New("kubelet root dir is empty")
	case !filepath.IsAbs(opts.KubeletRootDir):
		return nil, fmt.Errorf("kubelet root dir %q is not absolute", opts.KubeletRootDir)
	case opts.WorkloadAPISocketDir == "":
		return nil, errors.New("workload API socket dir is empty")
	case !filepath.IsAbs(opts.WorkloadAPISocketDir):
		return nil, fmt.Errorf("workload API socket dir %q is not absolute", opts.WorkloadAPISocketDir)
	case opts.Records == nil:
		return nil, errors.New("records store is nil")
	}
	if opts.Mounter == nil {
		opts.Mounter = NewMounter()
	}
	if opts.Ready == nil {
		opts.Ready = func() bool { return true }
	}
	return &Driver{
		name:        opts.DriverName,
		version:     opts.Version,
		nodeID:      opts.NodeID,
		kubeletRoot: filepath.Clean(opts.KubeletRootDir),
		socketDir:   filepath.Clean(opts.WorkloadAPISocketDir),
		records:     opts.Records,
		mounter:     opts.Mounter,
		ready:       opts.Ready,
		observe:     opts.Observe,
		now:         time.Now,
	}, nil
}
