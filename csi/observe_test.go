package csi

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

func TestObserveTellsPublishAndUnpublish(t *testing.T) {
	e := newFakeEnv(t)
	type call struct {
		op   string
		code codes.Code
	}
	var (
		mu  sync.Mutex
		got []call
	)
	e.d.observe = func(op string, err error, _ time.Duration) {
		mu.Lock()
		got = append(got, call{op, status.Code(err)})
		mu.Unlock()
	}
	socket := filepath.Join(e.root, "csi.sock")
	serve(t, e.d, socket)
	node := csipb.NewNodeClient(dial(t, socket))
	ctx := context.Background()
	if _, err := node.NodeGetInfo(ctx, &csipb.NodeGetInfoRequest{}); err != nil {
		t.Fatal(err)
	}
	_, _ = node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{})
	_, _ = node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{})
	want := []call{{"publish", codes.InvalidArgument}, {"unpublish", codes.InvalidArgument}}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("observed %v, want %v", got, want)
	}
}

func TestRegisteredHook(t *testing.T) {
	for _, registered := range []bool{true, false} {
		var got []bool
		s := registrationServer{opts: RegistrationOptions{DriverName: "d", Registered: func(ok bool) { got = append(got, ok) }}}
		if _, err := s.NotifyRegistrationStatus(context.Background(), &registerapi.RegistrationStatus{PluginRegistered: registered, Error: "e"}); err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0] != registered {
			t.Fatalf("kubelet reported %v: hook told %v", registered, got)
		}
	}
}
