package csi

import (
	"context"
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/internal/unixsock"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const defaultRegistrationPoll = 250 * time.Millisecond

// RegistrationOptions configure the kubelet plugin registration socket.
type RegistrationOptions struct {
	// RegistryDir is <kubelet-root>/plugins_registry.
	RegistryDir string
	// DriverName names the plugin and its socket <DriverName>-reg.sock.
	DriverName string
	// Endpoint is the CSI socket path as the kubelet sees it (host path).
	Endpoint string
	// SupportedVersions defaults to ["1.0.0"].
	SupportedVersions []string
	// PollInterval is how often the socket file is checked; default 250ms.
	PollInterval time.Duration
}

// RegistrationSocket returns the path of the registration socket.
func (o RegistrationOptions) RegistrationSocket() string {
	return filepath.Join(o.RegistryDir, o.DriverName+"-reg.sock")
}

// ServeRegistration serves pluginregistration.v1.Registration on
// <RegistryDir>/<DriverName>-reg.sock until ctx is done, so the kubelet
// registers the driver without a registrar sidecar. The kubelet watches the
// directory; if the socket file disappears (someone cleaned the directory)
// it is created again so that the kubelet registers the driver again.
func ServeRegistration(ctx context.Context, opts RegistrationOptions) error {
	switch {
	case opts.RegistryDir == "" || !filepath.IsAbs(opts.RegistryDir):
		return fmt.Errorf("registry dir %q is not an absolute path", opts.RegistryDir)
	case filepath.Base(opts.DriverName) != opts.DriverName:
		// The configuration validates driver names; here it names a file.
		return fmt.Errorf("driver name %q is not a file name", opts.DriverName)
	case opts.Endpoint == "":
		return errors.New("registration endpoint is empty")
	}
	if len(opts.SupportedVersions) == 0 {
		opts.SupportedVersions = []string{"1.0.0"}
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = defaultRegistrationPoll
	}
	path := opts.RegistrationSocket()

	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(recoverUnary))
	registerapi.RegisterRegistrationServer(srv, registrationServer{opts: opts})

	ln, ino, err := listenRegistration(path)
	if err != nil {
		return err
	}
	go func(l net.Listener) { _ = srv.Serve(l) }(ln)
	klog.InfoS("Serving kubelet plugin registration", "socket", path, "driver", opts.DriverName, "endpoint", opts.Endpoint)

	tick := time.NewTicker(opts.PollInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			srv.Stop()
			if cur, err := inode(path); err == nil && cur == ino {
				_ = os.Remove(path)
			}
			return nil
		case <-tick.C:
		}
		if cur, err := inode(path); err == nil && cur == ino {
			continue
		}
		// Gone or replaced: the old listener is unreachable; serve a new one.
		newLn, newIno, err := listenRegistration(path)
		if err != nil {
			klog.ErrorS(err, "Re-creating the registration socket failed; will retry", "socket", path)
			continue
		}
		_ = ln.Close()
		ln, ino = newLn, newIno
		go func(l net.Listener) { _ = srv.Serve(l) }(ln)
		klog.InfoS("Re-created the registration socket", "socket", path)
	}
}

// listenRegistration creates the registration socket so that it appears
// already listening: the kubelet dials it on the create event, once.
func listenRegistration(path string) (*net.UnixListener, uint64, error) {
	ln, err := unixsock.ListenVisible(path, 0o600, 0o750)
	if err != nil {
		return nil, 0, err
	}
	ino, err := inode(path)
	if err != nil {
		_ = ln.Close()
		return nil, 0, err
	}
	return ln, ino, nil
}

func inode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	opts RegistrationOptions
}

func (s registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.opts.DriverName,
		Endpoint:          s.opts.Endpoint,
		SupportedVersions: s.opts.SupportedVersions,
	}, nil
}

func (s registrationServer) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.GetPluginRegistered() {
		klog.InfoS("Kubelet registered the CSI driver", "driver", s.opts.DriverName)
	} else {
		klog.ErrorS(errors.New(st.GetError()), "Kubelet failed to register the CSI driver", "driver", s.opts.DriverName)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
