package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/ginkgo/v2/types"
	"github.com/onsi/gomega"
	"google.golang.org/grpc"

	"github.com/csi-agent/csi-agent/internal/testutil"
)

// sanityVolumeSource stands in for what the kubelet does for an inline
// ephemeral volume: it names the volume and passes the pod's info in the
// volume context. csi-sanity creates volumes through a controller before it
// publishes them, so this test-only controller echoes the test parameters
// (the pod info) back as the volume context. The driver itself has no
// controller service.
type sanityVolumeSource struct {
	csipb.UnimplementedControllerServer
}

func (sanityVolumeSource) CreateVolume(_ context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	sum := sha256.Sum256([]byte(req.GetName()))
	return &csipb.CreateVolumeResponse{Volume: &csipb.Volume{
		VolumeId:      "csi-" + hex.EncodeToString(sum[:]),
		VolumeContext: req.GetParameters(),
	}}, nil
}

func (sanityVolumeSource) DeleteVolume(context.Context, *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	return &csipb.DeleteVolumeResponse{}, nil
}

func (sanityVolumeSource) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	return &csipb.ControllerGetCapabilitiesResponse{}, nil
}

// readOnlyLikeKubelet sets readonly on NodePublishVolume as the kubelet does
// for a pod volume with readOnly: true; csi-sanity always sends false, which
// this driver refuses by design.
func readOnlyLikeKubelet(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if r, ok := req.(*csipb.NodePublishVolumeRequest); ok {
		r.Readonly = true
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// sanitySkips are the csi-sanity suites that do not apply to a node-only
// plugin; see SANITY.md.
var sanitySkips = []string{`\[Controller Server\]`, `\[GroupController `}

// TestSanity runs csi-sanity with real mounts as root and with the fake
// mounter otherwise: Ginkgo runs a suite once per process, so not both.
func TestSanity(t *testing.T) {
	var e *env
	if os.Geteuid() == 0 || os.Getenv(testutil.RequireRootEnv) == "1" {
		testutil.RequireRoot(t)
		e = newEnv(t)
	} else {
		e = newFakeEnv(t)
	}
	t.Logf("mounts: %s", map[bool]string{true: "fake", false: "kernel"}[e.fake != nil])
	csiSocket := filepath.Join(e.root, "csi.sock")
	serve(t, e.d, csiSocket)

	ctrlSocket := filepath.Join(e.root, "volumes.sock")
	ctrlLn, err := listenKubelet(ctrlSocket)
	if err != nil {
		t.Fatal(err)
	}
	ctrl := grpc.NewServer()
	csipb.RegisterControllerServer(ctrl, sanityVolumeSource{})
	// csi-sanity asks every endpoint for its identity: answer as the driver.
	csipb.RegisterIdentityServer(ctrl, identityServer{d: e.d})
	go func() { _ = ctrl.Serve(ctrlLn) }()
	t.Cleanup(ctrl.Stop)

	csiDir := filepath.Join(e.kubeletRoot, "pods", testPodUID, "volumes", csiVolumesDir)
	if err := os.MkdirAll(csiDir, 0o750); err != nil {
		t.Fatal(err)
	}
	cfg := sanity.NewTestConfig()
	cfg.Address = csiSocket
	cfg.ControllerAddress = ctrlSocket
	// csi-sanity creates TargetPath and publishes at TargetPath/target.
	cfg.TargetPath = filepath.Join(csiDir, "sanity")
	cfg.StagingPath = filepath.Join(e.root, "staging")
	cfg.TestVolumeParameters = map[string]string{
		ctxEphemeral:      "true",
		ctxPodUID:         testPodUID,
		ctxPodNamespace:   testPodNS,
		ctxPodName:        testPodName,
		ctxServiceAccount: testSA,
	}
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithUnaryInterceptor(readOnlyLikeKubelet))

	sc := sanity.GinkgoTest(&cfg)
	var report ginkgo.Report
	ginkgo.ReportAfterSuite("csi-agent sanity summary", func(r ginkgo.Report) { report = r })
	gomega.RegisterFailHandler(ginkgo.Fail)
	suiteCfg, reporterCfg := ginkgo.GinkgoConfiguration()
	suiteCfg.SkipStrings = append(suiteCfg.SkipStrings, sanitySkips...)
	reporterCfg.NoColor = true
	ginkgo.RunSpecs(t, "csi-agent CSI sanity", suiteCfg, reporterCfg)
	sc.Finalize()

	counts := map[string]int{}
	for _, s := range report.SpecReports {
		if s.LeafNodeType != types.NodeTypeIt {
			continue
		}
		state := s.State.String()
		counts[state]++
		t.Logf("%-8s %s", state, s.FullText())
		if s.State.Is(types.SpecStateSkipped) && s.Failure.Message != "" {
			t.Logf("         reason: %s", s.Failure.Message)
		}
	}
	t.Logf("sanity: %v", counts)
	if counts["passed"] == 0 {
		t.Fatal("no sanity spec passed")
	}
	if got := e.mountsUnder(t, e.kubeletRoot); len(got) != 0 {
		t.Errorf("sanity left mounts: %v", got)
	}
	if got := e.store.All(); len(got) != 0 {
		t.Errorf("sanity left records: %+v", got)
	}
}
