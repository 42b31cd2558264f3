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
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/moby/sys/mountinfo"
	"k8s.io/mount-utils"

	"github.com/csi-agent/csi-agent/internal/records"
)

const (
	// DefaultDriverName is the CSI driver name unless --driver-name says otherwise.
	DefaultDriverName = "csi-agent.spiffe.io"
	// DefaultKubeletRootDir is the kubelet's --root-dir default.
	DefaultKubeletRootDir = "/var/lib/kubelet"
	// NodeNameEnv is the environment variable NodeName falls back to (set it
	// from the downward API: spec.nodeName).
	NodeNameEnv = "NODE_NAME"

	defaultVersion = "dev"
	maxNodeIDLen   = 256
)

// CSI: at most 63 characters, alphanumerics at both ends, dashes and dots between.
var driverNameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$`)

// Options configure a Driver.
type Options struct {
	DriverName, Version, NodeID string
	// KubeletRootDir is the kubelet's --root-dir; default DefaultKubeletRootDir.
	KubeletRootDir string
	// WorkloadAPISocketDir is the directory bind-mounted into pods.
	WorkloadAPISocketDir string
	// Records is where every publish is recorded before it is answered.
	Records *records.Store
	// Mounter is the seam to the mount table; nil means NewMounter().
	Mounter mount.Interface
	// Ready reports whether the Workload API serves (Probe); nil means always.
	Ready func() bool
}

// Driver serves the CSI Identity and Node services.
type Driver struct {
	name, version, nodeID string
	kubeletRoot           string
	socketDir             string
	records               *records.Store
	mounter               mount.Interface
	ready                 func() bool

	// Seams for tests.
	mountTable func() ([]*mountinfo.Info, error)
	now        func() time.Time
	hooks      testHooks

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
	if opts.DriverName == "" {
		opts.DriverName = DefaultDriverName
	}
	if !driverNameRE.MatchString(opts.DriverName) {
		return nil, fmt.Errorf("driver name %q: want at most 63 characters, letters, digits, '-' and '.', starting and ending with a letter or digit", opts.DriverName)
	}
	if opts.Version == "" {
		opts.Version = defaultVersion
	}
	if opts.NodeID == "" {
		return nil, errors.New("node ID is empty: set the node name flag or " + NodeNameEnv)
	}
	if len(opts.NodeID) > maxNodeIDLen {
		return nil, fmt.Errorf("node ID is longer than %d bytes", maxNodeIDLen)
	}
	if opts.KubeletRootDir == "" {
		opts.KubeletRootDir = DefaultKubeletRootDir
	}
	if !filepath.IsAbs(opts.KubeletRootDir) {
		return nil, fmt.Errorf("kubelet root dir %q is not absolute", opts.KubeletRootDir)
	}
	if opts.WorkloadAPISocketDir == "" {
		return nil, errors.New("workload API socket dir is empty")
	}
	if !filepath.IsAbs(opts.WorkloadAPISocketDir) {
		return nil, fmt.Errorf("workload API socket dir %q is not absolute", opts.WorkloadAPISocketDir)
	}
	if opts.Records == nil {
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
		mountTable:  func() ([]*mountinfo.Info, error) { return mountinfo.GetMounts(nil) },
		now:         time.Now,
	}, nil
}

// NodeName returns flagValue, or else the NodeNameEnv environment variable.
func NodeName(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	if v := os.Getenv(NodeNameEnv); v != "" {
		return v, nil
	}
	return "", fmt.Errorf("node name unknown: set the flag or %s (downward API spec.nodeName)", NodeNameEnv)
}
