package framework

import (
	"bufio"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"time"

	"github.com/csi-agent/csi-agent/internal/records"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Node is what the tests need from the machine under the cluster, beyond
// the API: the same checks run on the hermetic node and on a kind node.
type Node interface {
	Name() string
	// SocketDir is the host directory holding the Workload API socket.
	SocketDir() string
	// KubeletRootDir is the kubelet's --root-dir on the node.
	KubeletRootDir() string
	// Mounts is the node's mount table (the kubelet's mount namespace).
	Mounts(ctx context.Context) ([]Mount, error)
	// Records are the agent's CSI publish records on the node.
	Records(ctx context.Context) ([]records.Record, error)
	// RestartKubelet stops the kubelet and starts it again with the same
	// configuration, returning once it serves again.
	RestartKubelet(ctx context.Context) error
	// KillContainer sends SIGKILL to a container's main process.
	KillContainer(ctx context.Context, containerID string) error
}

func (n *Local) Name() string           { return NodeName }
func (n *Local) SocketDir() string      { return filepath.Join(n.d.agentRun, "sockets") }
func (n *Local) KubeletRootDir() string { return n.d.kubeletRoot }

func (n *Local) Mounts(context.Context) ([]Mount, error) {
	m := readMountinfo("/proc/self/mountinfo")
	if m == nil {
		return nil, errors.New("cannot read /proc/self/mountinfo")
	}
	return m, nil
}

func (n *Local) Records(context.Context) ([]records.Record, error) {
	return records.Load(filepath.Join(n.d.agentState, "records"))
}

func (n *Local) RestartKubelet(ctx context.Context) error {
	if err := n.stop("kubelet", 30*time.Second); err != nil {
		return err
	}
	if err := n.start("kubelet", n.kubeletArgs...); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		if err := n.exited("kubelet"); err != nil {
			return false, err
		}
		return kubeletHealthy(ctx), nil
	})
}

func (n *Local) KillContainer(ctx context.Context, id string) error {
	return n.ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", strings.TrimPrefix(id, "containerd://"))
}

// MountsAt returns the mounts whose mount point is exactly path.
func MountsAt(ms []Mount, path string) []Mount {
	var out []Mount
	for _, m := range ms {
		if m.MountPoint == path {
			out = append(out, m)
		}
	}
	return out
}

// MountsUnder returns the mounts at or below dir.
func MountsUnder(ms []Mount, dir string) []Mount {
	var out []Mount
	for _, m := range ms {
		if under(m.MountPoint, dir) {
			out = append(out, m)
		}
	}
	return out
}

func parseMountinfoText(s string) []Mount {
	return parseMountinfo(bufio.NewScanner(strings.NewReader(s)))
}
