package framework

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/csi-agent/csi-agent/internal/records"
	"k8s.io/apimachinery/pkg/util/wait"
)

// Kind is a node of a kind cluster, reached with docker exec; the agent runs
// there from the deploy DaemonSet with the deploy paths.
type Kind struct {
	Container string // the node's container, e.g. csi-agent-e2e-control-plane
}

func (k *Kind) exec(ctx context.Context, script string) (string, error) {
	out, err := exec.CommandContext(ctx, "docker", "exec", k.Container, "sh", "-c", script).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker exec %s %q: %w: %s", k.Container, script, err, out)
	}
	return string(out), nil
}

func (k *Kind) Name() string           { return k.Container }
func (k *Kind) SocketDir() string      { return "/run/csi-agent/sockets" }
func (k *Kind) KubeletRootDir() string { return "/var/lib/kubelet" }

func (k *Kind) Mounts(ctx context.Context) ([]Mount, error) {
	out, err := k.exec(ctx, "cat /proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return parseMountinfoText(out), nil
}

// Records copies the node's records directory out and reads it with the
// records package, as the agent would.
func (k *Kind) Records(ctx context.Context) ([]records.Record, error) {
	tmp, err := os.MkdirTemp("", "csi-agent-records-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "docker", "cp", k.Container+":/var/lib/csi-agent/records", tmp).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("docker cp records: %w: %s", err, out)
	}
	return records.Load(filepath.Join(tmp, "records"))
}

func (k *Kind) RestartKubelet(ctx context.Context) error {
	if _, err := k.exec(ctx, "systemctl restart kubelet"); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		out, err := k.exec(ctx, "curl -fsS http://127.0.0.1:10248/healthz")
		return err == nil && strings.TrimSpace(out) == "ok", nil
	})
}

func (k *Kind) KillContainer(ctx context.Context, id string) error {
	_, err := k.exec(ctx, "ctr -n k8s.io tasks kill --signal SIGKILL "+strings.TrimPrefix(id, "containerd://"))
	return err
}
