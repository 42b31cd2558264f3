package csi

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/csi-agent/csi-agent/internal/records"
)

func dial(t testing.TB, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// serve runs d.Serve on socket until the test ends.
func serve(t testing.TB, d *Driver, socket string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, socket) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for !isSocket(socket) {
		if time.Now().After(deadline) {
			t.Fatal("CSI socket did not appear")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeIdentityAndNodeInfo(t *testing.T) {
	e := newEnv(t)
	var ready atomic.Bool
	store, _ := records.Open(filepath.Join(e.root, "state2"))
	d, err := New(Options{DriverName: "csi.spiffe.io", Version: "1.2.3", NodeID: "node-a", KubeletRootDir: e.kubeletRoot, WorkloadAPISocketDir: e.socketDir, Records: store, Ready: ready.Load})
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(e.root, "csi", "csi.sock")
	serve(t, d, socket)
	conn := dial(t, socket)
	ids := csipb.NewIdentityClient(conn)
	ctx := context.Background()

	info, err := ids.GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
	if err != nil || info.GetName() != "csi.spiffe.io" || info.GetVendorVersion() != "1.2.3" {
		t.Fatalf("GetPluginInfo = %+v, %v", info, err)
	}
	caps, err := ids.GetPluginCapabilities(ctx, &csipb.GetPluginCapabilitiesRequest{})
	if err != nil || len(caps.GetCapabilities()) != 0 {
		t.Fatalf("GetPluginCapabilities = %+v, %v", caps, err)
	}
	probe, err := ids.Probe(ctx, &csipb.ProbeRequest{})
	if err != nil || probe.GetReady() == nil || probe.GetReady().GetValue() {
		t.Fatalf("Probe before the Workload API serves = %+v, %v", probe, err)
	}
	ready.Store(true)
	if probe, err = ids.Probe(ctx, &csipb.ProbeRequest{}); err != nil || !probe.GetReady().GetValue() {
		t.Fatalf("Probe when serving = %+v, %v", probe, err)
	}

	node := csipb.NewNodeClient(conn)
	ni, err := node.NodeGetInfo(ctx, &csipb.NodeGetInfoRequest{})
	if err != nil || ni.GetNodeId() != "node-a" {
		t.Fatalf("NodeGetInfo = %+v, %v", ni, err)
	}
	nc, err := node.NodeGetCapabilities(ctx, &csipb.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []csipb.NodeServiceCapability_RPC_Type
	for _, c := range nc.GetCapabilities() {
		got = append(got, c.GetRpc().GetType())
	}
	want := []csipb.NodeServiceCapability_RPC_Type{csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS, nodeVolumeConditionCapa, csipb.NodeServiceCapability_RPC_GET_VOLUME_HEALTH}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("node capabilities %v, want %v", got, want)
	}
	_, err = node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{})
	wantCode(t, err, codes.Unimplemented)
	if fi, err := os.Stat(socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
}

func TestServeSocketFile(t *testing.T) {
	e := newEnv(t)
	socket := filepath.Join(e.root, "csi.sock")

	// A stale socket file (a killed agent) is replaced.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.d.Serve(ctx, socket) }()
	conn := dial(t, socket)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := csipb.NewIdentityClient(conn).GetPluginInfo(context.Background(), &csipb.GetPluginInfoRequest{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server on a stale socket path: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// A live server is not taken over.
	err = e.d.Serve(context.Background(), socket)
	if err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("second Serve on a live socket: %v", err)
	}
	// A regular file is not removed.
	file := filepath.Join(e.root, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Serve(context.Background(), file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Serve on a regular file: %v", err)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := os.Lstat(socket); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left after stop: %v", err)
	}
}

func TestToStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{invalidf("x"), codes.InvalidArgument},
		{notFoundf("x"), codes.NotFound},
		{conflictf("x"), codes.FailedPrecondition},
		{alreadyExistsf("x"), codes.AlreadyExists},
		{errors.New("disk on fire"), codes.Internal},
		{context.Canceled, codes.Canceled},
		{errors.Join(errors.New("a"), invalidf("b")), codes.InvalidArgument},
	} {
		wantCode(t, toStatus(tc.err), tc.code)
	}
	if toStatus(nil) != nil {
		t.Fatal("toStatus(nil) != nil")
	}
}

func TestRecoverUnary(t *testing.T) {
	_, err := recoverUnary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/x"}, func(context.Context, any) (any, error) {
		panic("boom")
	})
	wantCode(t, err, codes.Internal)
}
