package csi

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-agent/csi-agent/internal/config"
)

// kubeletRegister does what the kubelet's plugin watcher does with a new
// socket: GetInfo, then NotifyRegistrationStatus.
func kubeletRegister(t *testing.T, socket string) *registerapi.PluginInfo {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := registerapi.NewRegistrationClient(conn)
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("NotifyRegistrationStatus: %v", err)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{Error: "version mismatch"}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(failure): %v", err)
	}
	return info
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func isSocket(path string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.Mode().Type() == fs.ModeSocket
}

func TestServeRegistration(t *testing.T) {
	for _, driver := range []string{config.DefaultDriverName, "csi.spiffe.io"} {
		t.Run(driver, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "plugins_registry")
			opts := RegistrationOptions{
				RegistryDir:  dir,
				DriverName:   driver,
				Endpoint:     "/var/lib/kubelet/plugins/" + driver + "/csi.sock",
				PollInterval: 20 * time.Millisecond,
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- ServeRegistration(ctx, opts) }()
			t.Cleanup(func() {
				cancel()
				<-done
			})
			socket := filepath.Join(dir, driver+"-reg.sock")
			if socket != opts.RegistrationSocket() {
				t.Fatalf("RegistrationSocket() = %s", opts.RegistrationSocket())
			}
			waitFor(t, "the registration socket", func() bool { return isSocket(socket) })

			check := func() {
				t.Helper()
				info := kubeletRegister(t, socket)
				if info.GetType() != registerapi.CSIPlugin || info.GetName() != driver ||
					info.GetEndpoint() != opts.Endpoint || !slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
					t.Fatalf("GetInfo = %+v", info)
				}
			}
			check()

			// The directory gets cleaned: the socket comes back and the
			// kubelet can register the driver again.
			for i := 0; i < 2; i++ {
				if err := os.Remove(socket); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the re-created socket", func() bool { return isSocket(socket) })
				check()
			}

			cancel()
			if err := <-done; err != nil {
				t.Fatalf("ServeRegistration: %v", err)
			}
			done <- nil // for the cleanup
			if _, err := os.Lstat(socket); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("socket left after stop: %v", err)
			}
		})
	}
}

func TestServeRegistrationRejectsBadOptions(t *testing.T) {
	for _, opts := range []RegistrationOptions{
		{RegistryDir: "relative", DriverName: config.DefaultDriverName, Endpoint: "/x"},
		{RegistryDir: "/tmp", DriverName: "bad/name", Endpoint: "/x"},
		{RegistryDir: "/tmp", DriverName: config.DefaultDriverName},
	} {
		if err := ServeRegistration(context.Background(), opts); err == nil {
			t.Errorf("%+v accepted", opts)
		}
	}
}
