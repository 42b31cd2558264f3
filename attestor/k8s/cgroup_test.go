package k8s

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

const (
	testPodUID       = "7b1d3c4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e"
	testStaticPodUID = "0d1f2e3c4b5a69788796a5b4c3d2e1f0"
	testContainerID  = "3f4c2a1b9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b"
)

func TestParseCgroupFiles(t *testing.T) {
	tests := []struct {
		file        string
		podUID      string
		containerID string
		wantErr     string
	}{
		// cgroup v1 (hybrid: v1 controllers plus the "0::" unified line).
		{file: "v1-cgroupfs-containerd", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-cgroupfs-docker-guaranteed", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-cgroupfs-crio", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-systemd-containerd", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-systemd-docker", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-systemd-crio", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-systemd-guaranteed", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-containerd-colon", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-kind-cgroupfs", podUID: testPodUID, containerID: testContainerID},
		{file: "v1-hybrid-unified-service", podUID: testPodUID, containerID: testContainerID},
		// In the pod but in no container cgroup we can name: pod-level only.
		{file: "v1-systemd-crio-conmon", podUID: testPodUID},
		{file: "v1-pod-only", podUID: testPodUID},
		// cgroup v2.
		{file: "v2-systemd-containerd", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-cgroupfs-containerd", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-systemd-crio-container-subdir", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-kind-systemd", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-cgroupns-systemd", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-cgroupns-cgroupfs", podUID: testPodUID, containerID: testContainerID},
		{file: "v2-static-pod", podUID: testStaticPodUID, containerID: testContainerID},
		// Sub-cgroups a container made below its own do not change the answer.
		{file: "v2-nested-subcgroups", podUID: testPodUID, containerID: testContainerID},
		// Not pods.
		{file: "host-v1-systemd-session"},
		{file: "host-v2-service"},
		{file: "host-v2-root"},
		{file: "host-docker"},
		{file: "host-v2-podman-pod"},
		{file: "host-process-api"},
		// Errors.
		{file: "bad-conflicting-pods", wantErr: "conflicts"},
		{file: "bad-conflicting-containers", wantErr: "conflicts"},
		{file: "bad-malformed-uid", wantErr: "malformed pod UID"},
		{file: "bad-malformed-systemd-uid", wantErr: "malformed pod UID"},
		{file: "bad-colon-no-id", wantErr: "no container ID"},
		{file: "bad-line", wantErr: "line 2"},
		// Pod-shaped names in a subtree someone else can create (a user
		// session's delegated cgroups): never a pod.
		{file: "bad-spoof-user-session", wantErr: "outside the kubepods hierarchy"},
		{file: "bad-spoof-kubepods-under-user", wantErr: "outside the kubepods hierarchy"},
		{file: "bad-spoof-systemd-under-user", wantErr: "outside the kubepods hierarchy"},
		{file: "bad-spoof-cgroupns-user", wantErr: "outside the kubepods hierarchy"},
	}
	seen := map[string]bool{}
	for _, tt := range tests {
		seen[tt.file+".txt"] = true
		t.Run(tt.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", "cgroup", tt.file+".txt"))
			if err != nil {
				t.Fatal(err)
			}
			podUID, containerID, err := ParseCgroup(data)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				if podUID != "" || containerID != "" {
					t.Fatalf("error with values %q %q", podUID, containerID)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if podUID != tt.podUID || containerID != tt.containerID {
				t.Fatalf("got (%q, %q), want (%q, %q)", podUID, containerID, tt.podUID, tt.containerID)
			}
		})
	}
	// Every file in testdata is checked by the table.
	files, _ := filepath.Glob(filepath.Join("testdata", "cgroup", "*.txt"))
	for _, f := range files {
		if !seen[filepath.Base(f)] {
			t.Errorf("testdata file %s has no table entry", f)
		}
	}
}

func TestParseCgroupLines(t *testing.T) {
	uid := testPodUID
	uidU := strings.ReplaceAll(uid, "-", "_")
	cid := testContainerID
	tests := []struct {
		name, in    string
		podUID, cid string
		wantErr     bool
	}{
		{name: "empty", in: ""},
		{name: "blank lines", in: "\n\n0::/\n\n"},
		{name: "no trailing newline", in: "0::/kubepods/besteffort/pod" + uid + "/" + cid, podUID: uid, cid: cid},
		{name: "uppercase uid is not a pod uid", in: "0::/kubepods/besteffort/pod" + strings.ToUpper(uid) + "/" + cid},
		{name: "podman-like name", in: "0::/podman/" + cid},
		{name: "pod prefix on non-uid", in: "0::/pods/x"},
		{name: "uid with underscores under cgroupfs", in: "0::/kubepods/pod" + uidU + "/" + cid},
		{name: "slice outside kubepods", in: "0::/machine.slice/machine-pod" + uidU + ".slice/" + cid},
		{name: "systemd uid with dashes is not systemd", in: "0::/kubepods.slice/kubepods-pod" + uid + ".slice/" + cid},
		{name: "short container id", in: "0::/kubepods/pod" + uid + "/" + cid[:63], podUID: uid},
		{name: "uppercase container id", in: "0::/kubepods/pod" + uid + "/" + strings.ToUpper(cid), podUID: uid},
		{name: "unknown runtime prefix", in: "0::/kubepods/pod" + uid + "/runc-" + cid + ".scope", podUID: uid},
		{name: "double slashes", in: "0::/kubepods//pod" + uid + "//" + cid, podUID: uid, cid: cid},
		{name: "pod and container agree, one line lacks container", in: "1:cpu:/kubepods/pod" + uid + "\n0::/kubepods/pod" + uid + "/" + cid + "\n", podUID: uid, cid: cid},
		{name: "one line in pod, one at root", in: "1:cpu:/\n0::/kubepods/pod" + uid + "/" + cid + "\n", podUID: uid, cid: cid},
		{name: "missing path field", in: "0:cpu\n", wantErr: true},
		{name: "relative path", in: "0::kubepods/pod" + uid + "\n", wantErr: true},
		{name: "non-numeric hierarchy", in: "x::/\n", wantErr: true},
		{name: "malformed static uid length", in: "0::/kubepods/pod" + testStaticPodUID + "0/" + cid, wantErr: true},
		{name: "dash uid misplaced", in: "0::/kubepods/pod7b1d3c4e5-f6a-4b7c-8d9e-0f1a2b3c4d5e/" + cid, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			podUID, containerID, err := ParseCgroup([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if podUID != tt.podUID || containerID != tt.cid {
				t.Fatalf("got (%q, %q), want (%q, %q)", podUID, containerID, tt.podUID, tt.cid)
			}
		})
	}
}

var (
	podUIDForm      = regexp.MustCompile(`^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})$`)
	containerIDForm = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

func FuzzParseCgroup(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "cgroup", "*.txt"))
	if err != nil || len(files) == 0 {
		f.Fatalf("no seed files: %v", err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("0::/../pod" + testPodUID + "/" + testContainerID))
	f.Add([]byte("0::/kubepods-pod" + testStaticPodUID + ".slice:crio:" + testContainerID))
	f.Fuzz(func(t *testing.T, data []byte) {
		podUID, containerID, err := ParseCgroup(data)
		if err != nil {
			if podUID != "" || containerID != "" {
				t.Fatalf("error %v came with values %q %q", err, podUID, containerID)
			}
			return
		}
		if podUID == "" && containerID != "" {
			t.Fatalf("container ID %q without a pod", containerID)
		}
		if podUID != "" && !podUIDForm.MatchString(podUID) {
			t.Fatalf("pod UID %q is not in API form", podUID)
		}
		if containerID != "" && !containerIDForm.MatchString(containerID) {
			t.Fatalf("container ID %q is not 64 hex", containerID)
		}
		// The answer is a property of the lines, not of their order or repetition.
		lines := strings.Split(string(data), "\n")
		rev := make([]string, 0, 2*len(lines))
		for i := len(lines) - 1; i >= 0; i-- {
			rev = append(rev, lines[i])
		}
		rev = append(rev, lines...)
		p2, c2, err2 := ParseCgroup([]byte(strings.Join(rev, "\n")))
		if err2 != nil || p2 != podUID || c2 != containerID {
			t.Fatalf("reordered input: (%q, %q, %v), original (%q, %q)", p2, c2, err2, podUID, containerID)
		}
	})
}
