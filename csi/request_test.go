package csi

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// TestPublishInvalidRequests goes through the gRPC method: every request here
// must be InvalidArgument with a message that tells the user what to change,
// and must leave nothing mounted or recorded.
func TestPublishInvalidRequests(t *testing.T) {
	e := newEnv(t)
	target := e.target(t, testPodUID, "spiffe")
	otherPod := "11111111-2222-3333-4444-555555555555"

	tests := []struct {
		name   string
		mutate func(r *csipb.NodePublishVolumeRequest)
		want   []string
	}{
		{"no volume id", func(r *csipb.NodePublishVolumeRequest) { r.VolumeId = "" }, []string{"volume_id is missing"}},
		{"volume id too long", func(r *csipb.NodePublishVolumeRequest) { r.VolumeId = strings.Repeat("v", 129) }, []string{"volume_id is longer than 128"}},
		{"no target", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = "" }, []string{"target_path is missing"}},
		{"no capability", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability = nil }, []string{"volume_capability is missing"}},
		{"block", func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}
		}, []string{"block volumes are not supported", "volumeMounts"}},
		{"no access type", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.AccessType = nil }, []string{"only mount volumes"}},
		{"fsType", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().FsType = "ext4" }, []string{`fsType "ext4"`, "remove fsType"}},
		{"mount flags", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().MountFlags = []string{"rw"} }, []string{"mount flags"}},
		{"mount group", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().VolumeMountGroup = "1000" }, []string{"volume_mount_group"}},
		{"no access mode", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.AccessMode = nil }, []string{"access_mode is missing"}},
		{"multi node", func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessMode.Mode = csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
		}, []string{"MULTI_NODE_MULTI_WRITER is not supported"}},
		{"not read-only", func(r *csipb.NodePublishVolumeRequest) { r.Readonly = false }, []string{`set "readOnly: true" on the pod's csi volume`}},
		{"not ephemeral", func(r *csipb.NodePublishVolumeRequest) { delete(r.VolumeContext, ctxEphemeral) }, []string{"only CSI ephemeral inline volumes", "not through a PersistentVolume"}},
		{"ephemeral false", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[ctxEphemeral] = "false" }, []string{"only CSI ephemeral inline volumes"}},
		{"no pod info", func(r *csipb.NodePublishVolumeRequest) {
			delete(r.VolumeContext, ctxPodUID)
			delete(r.VolumeContext, ctxServiceAccount)
		}, []string{"podInfoOnMount: true", ctxPodUID, ctxServiceAccount}},
		{"unknown attribute", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext["spiffeID"] = "x" }, []string{`"spiffeID"`, "volumeAttributes"}},
		{"bad pod uid", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[ctxPodUID] = "../x" }, []string{"is not a pod UID"}},
		{"bad namespace", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[ctxPodNamespace] = "Payments" }, []string{"is not a namespace name"}},
		{"bad pod name", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[ctxPodName] = "a/b" }, []string{"is not a pod name"}},
		{"bad service account", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext[ctxServiceAccount] = "sa\n" }, []string{"is not a service account name"}},
		{"relative target", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = "pods/x/mount" }, []string{"is not absolute"}},
		{"target outside kubelet root", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = filepath.Join(e.root, "elsewhere", "mount") }, []string{"is not under the kubelet directory"}},
		{"target with ..", func(r *csipb.NodePublishVolumeRequest) {
			r.TargetPath = filepath.Join(e.kubeletRoot, "pods", testPodUID, "volumes", csiVolumesDir) + "/../../../../../etc/mount"
		}, []string{`contains ".."`}},
		{"target of another pod", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = e.target(t, otherPod, "spiffe") }, []string{"belongs to pod " + otherPod, "not to pod " + testPodUID}},
		{"target in emptyDir", func(r *csipb.NodePublishVolumeRequest) {
			r.TargetPath = filepath.Join(e.kubeletRoot, "pods", testPodUID, "volumes", "kubernetes.io~empty-dir", "cache", "mount")
		}, []string{"is not a CSI volume path"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := publishReq(testPodUID, target)
			tc.mutate(req)
			_, err := e.node.NodePublishVolume(context.Background(), req)
			wantCode(t, err, codes.InvalidArgument, tc.want...)
		})
	}
	if got := mountsUnder(t, e.root); len(got) != 0 {
		t.Errorf("refused publishes left mounts: %v", got)
	}
	if got := e.store.All(); len(got) != 0 {
		t.Errorf("refused publishes left records: %v", got)
	}
}

func TestValidatePublishAccepts(t *testing.T) {
	for _, mode := range []csipb.VolumeCapability_AccessMode_Mode{
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
	} {
		req := publishReq(testPodUID, "/var/lib/kubelet/pods/"+testPodUID+"/volumes/kubernetes.io~csi/spiffe/mount")
		req.VolumeCapability.AccessMode.Mode = mode
		// The kubelet adds service account tokens when the CSIDriver asks.
		req.VolumeContext[ctxPrefix+"serviceAccount.tokens"] = "{}"
		p, err := validatePublish(req)
		if err != nil {
			t.Fatalf("%v: %v", mode, err)
		}
		want := publishRequest{volumeID: req.VolumeId, target: req.TargetPath, podUID: testPodUID, podNamespace: testPodNS, podName: testPodName, serviceAccount: testSA}
		if p != want {
			t.Fatalf("got %+v, want %+v", p, want)
		}
	}
}

// FuzzValidatePublish: no input crashes, and whatever is accepted carries a
// pod UID that is a single safe path segment.
func FuzzValidatePublish(f *testing.F) {
	f.Add("csi-1", "/var/lib/kubelet/pods/"+testPodUID+"/volumes/kubernetes.io~csi/v/mount", testPodUID, testPodNS, testPodName, testSA, "true", true)
	f.Add("", "", "", "", "", "", "", false)
	f.Add("v", "/x", "..", "ns", "n", "sa", "true", true)
	f.Add("v", "/x", "a/b", "ns", "n", "sa", "TRUE", true)
	f.Fuzz(func(t *testing.T, vol, target, uid, ns, name, sa, eph string, ro bool) {
		req := publishReq(uid, target)
		req.VolumeId, req.Readonly = vol, ro
		req.VolumeContext[ctxPodNamespace], req.VolumeContext[ctxPodName] = ns, name
		req.VolumeContext[ctxServiceAccount], req.VolumeContext[ctxEphemeral] = sa, eph
		p, err := validatePublish(req)
		if err != nil {
			if kindOf(err) != kindInvalid {
				t.Fatalf("error of kind %v: %v", kindOf(err), err)
			}
			return
		}
		if !ro || eph != "true" || p.podUID == "" || strings.ContainsAny(p.podUID, "/.\x00") {
			t.Fatalf("accepted %+v (readonly=%v, ephemeral=%q)", p, ro, eph)
		}
	})
}

func TestSplitTarget(t *testing.T) {
	const root = "/var/lib/kubelet"
	good := root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi/spiffe/mount"
	tests := []struct {
		target string
		want   string // error substring, "" for success
	}{
		{good, ""},
		{root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi/spiffe", ""},
		{"pods/x", "not absolute"},
		{root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi/../../../../../../etc", `contains ".."`},
		{root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi/./x", `contains "."`},
		{root + "/pods//" + testPodUID + "/volumes/kubernetes.io~csi/x/mount", "not a clean path"},
		{good + "/", "not a clean path"},
		{"/var/lib/kubelet2/pods/" + testPodUID + "/volumes/kubernetes.io~csi/spiffe/mount", "not under the kubelet directory"},
		{"/etc/passwd", "not under the kubelet directory"},
		{root, "not under the kubelet directory"},
		{root + "/plugins/" + testPodUID + "/volumes/kubernetes.io~csi/spiffe/mount", "not a CSI volume path"},
		{root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi", "not a CSI volume path"},
		{root + "/pods/" + testPodUID + "/volume/kubernetes.io~csi/x/mount", "not a CSI volume path"},
		{root + "/pods/" + testPodUID + "/volumes/kubernetes.io~secret/x/mount", "not a CSI volume path"},
		{root + "/pods/-bad/volumes/kubernetes.io~csi/x/mount", "is not a pod UID"},
	}
	for _, tc := range tests {
		uid, _, err := splitTarget(root, tc.target)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: unexpected error %v", tc.target, err)
		case tc.want == "" && uid != testPodUID:
			t.Errorf("%s: pod UID %q", tc.target, uid)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: got %v, want error containing %q", tc.target, err, tc.want)
		case tc.want != "" && kindOf(err) != kindInvalid:
			t.Errorf("%s: error kind %v", tc.target, kindOf(err))
		}
	}
}

// FuzzSplitTarget: an accepted target is clean, has no dot segments and lies
// in the CSI volume directory of the pod it names.
func FuzzSplitTarget(f *testing.F) {
	const root = "/var/lib/kubelet"
	f.Add(root + "/pods/" + testPodUID + "/volumes/kubernetes.io~csi/spiffe/mount")
	f.Add(root + "/pods/x/volumes/kubernetes.io~csi/../../../y/z")
	f.Add("/")
	f.Add("")
	f.Add(root + "/pods/x/volumes/kubernetes.io~csi/a//b")
	f.Fuzz(func(t *testing.T, target string) {
		uid, rel, err := splitTarget(root, target)
		if err != nil {
			if kindOf(err) != kindInvalid {
				t.Fatalf("error of kind %v: %v", kindOf(err), err)
			}
			return
		}
		if filepath.Clean(target) != target || filepath.Join(root, rel) != target {
			t.Fatalf("accepted unclean %q", target)
		}
		if !isUnder(target, filepath.Join(root, "pods", uid, "volumes", csiVolumesDir)) || target == filepath.Join(root, "pods", uid, "volumes", csiVolumesDir) {
			t.Fatalf("accepted %q outside pod %q's CSI volumes", target, uid)
		}
		for _, seg := range strings.Split(rel, "/") {
			if seg == ".." || seg == "." || seg == "" {
				t.Fatalf("accepted %q with segment %q", target, seg)
			}
		}
	})
}

func TestWalkNoSymlinks(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "a", "b"), 0o755))
	must(os.Symlink(outside, filepath.Join(root, "a", "link")))
	must(os.WriteFile(filepath.Join(root, "a", "file"), nil, 0o644))

	if p, exists, err := walkNoSymlinks(root, "a/b"); err != nil || !exists || p != filepath.Join(root, "a/b") {
		t.Errorf("a/b: %q %v %v", p, exists, err)
	}
	if p, exists, err := walkNoSymlinks(root, "a/b/c/d"); err != nil || exists || p != filepath.Join(root, "a/b/c/d") {
		t.Errorf("a/b/c/d: %q %v %v", p, exists, err)
	}
	for _, rel := range []string{"a/link", "a/link/mount", "a/file", "a/file/x"} {
		if _, _, err := walkNoSymlinks(root, rel); err == nil || kindOf(err) != kindInvalid {
			t.Errorf("%s: got %v, want an invalid-argument error", rel, err)
		}
	}
}
