package framework

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// KubernetesVersion reads the k8s.io/kubernetes version the tools module pins.
func KubernetesVersion(toolsDir string) (string, error) {
	f, err := os.Open(filepath.Join(toolsDir, "go.mod"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "k8s.io/kubernetes" && i+1 < len(fields) && strings.HasPrefix(fields[i+1], "v") {
				return fields[i+1], nil
			}
		}
	}
	return "", fmt.Errorf("%s/go.mod: no k8s.io/kubernetes requirement", toolsDir)
}

// BuildKubernetes builds kubelet and kube-apiserver from the tools module, or
// returns the ones cached for this version under cacheDir.
func BuildKubernetes(ctx context.Context, toolsDir, cacheDir string, logf func(string, ...any)) (kubelet, apiserver string, err error) {
	version, err := KubernetesVersion(toolsDir)
	if err != nil {
		return "", "", err
	}
	dir := filepath.Join(cacheDir, "kubernetes-"+version)
	kubelet, apiserver = filepath.Join(dir, "kubelet"), filepath.Join(dir, "kube-apiserver")
	if fileExists(kubelet) && fileExists(apiserver) {
		return kubelet, apiserver, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", "", err
	}
	tmp, err := os.MkdirTemp(cacheDir, "build-")
	if err != nil {
		return "", "", err
	}
	defer os.RemoveAll(tmp)
	logf("building kubelet and kube-apiserver %s (cold: several minutes on 2 cores)", version)
	minor := strings.SplitN(strings.TrimPrefix(version, "v"), ".", 3)[1]
	ldflags := strings.Join([]string{
		"-s", "-w",
		"-X k8s.io/component-base/version.gitVersion=" + version,
		"-X k8s.io/component-base/version.gitMajor=1",
		"-X k8s.io/component-base/version.gitMinor=" + minor,
		"-X k8s.io/component-base/version.gitTreeState=clean",
	}, " ")
	if err := goBuild(ctx, toolsDir, "-ldflags", ldflags, "-o", tmp+"/", "k8s.io/kubernetes/cmd/kubelet", "k8s.io/kubernetes/cmd/kube-apiserver"); err != nil {
		return "", "", err
	}
	// A finished build appears at once or not at all.
	if err := os.Rename(tmp, dir); err != nil {
		return "", "", err
	}
	return kubelet, apiserver, nil
}

// goBuild runs a static, reproducible go build in dir.
func goBuild(ctx context.Context, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-trimpath"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build %s (in %s): %w\n%s", strings.Join(args, " "), dir, err, out)
	}
	return nil
}

// BuildImages builds the agent (from the repository root), the test workload
// and the pause binary, and writes them as one docker-archive.
func BuildImages(ctx context.Context, repoRoot, e2eDir, out string) error {
	bin := filepath.Join(filepath.Dir(out), "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	if err := goBuild(ctx, repoRoot, "-o", filepath.Join(bin, "csi-agent"), "./cmd/csi-agent"); err != nil {
		return fmt.Errorf("the agent does not build: %w", err)
	}
	if err := goBuild(ctx, e2eDir, "-o", bin+"/", "./workload", "./pause"); err != nil {
		return err
	}
	return WriteArchive(out,
		Image{Tag: AgentImage, Files: map[string]string{"csi-agent": filepath.Join(bin, "csi-agent")}, Entrypoint: []string{"/csi-agent"}},
		Image{Tag: WorkloadImage, Files: map[string]string{"workload": filepath.Join(bin, "workload")}, Entrypoint: []string{"/workload"}},
		// The same workload under the name spiffe-csi's example manifest
		// runs, with no args there: it watches.
		Image{Tag: SpiffeCSIWorkloadImage, Files: map[string]string{"workload": filepath.Join(bin, "workload")}, Entrypoint: []string{"/workload", "watch"}, User: "65532:65532"},
		Image{Tag: PauseImage, Files: map[string]string{"pause": filepath.Join(bin, "pause")}, Entrypoint: []string{"/pause"}, User: "65535:65535"},
	)
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
