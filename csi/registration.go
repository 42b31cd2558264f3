package csi

import (
	"context"
	"errors"
	"fmt"
	"github.com/csi-agent/csi-agent/internal/unixsock"
	"net"
	"path/filepath"
	"time"

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
	// Registered, if set, is told what the kubelet reports of each
	// registration: true when it registered the driver.
	Registered func(ok bool)
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
	klog.InfoS("Serving kubelet plugin registration", "socket", path, "driver", opts.DriverName, "endpoint", opts.Endpoint)
	return unixsock.ServeKept(ctx, srv, unixsock.KeptOptions{
		Path: path,
		// Made so that it appears already listening: the kubelet dials it
		// on the create event, once.
		Listen:      func() (*net.UnixListener, error) { return unixsock.ListenVisible(path, 0o600, 0o750) },
		Poll:        opts.PollInterval,
		StopTimeout: registrationStopTimeout,
	})
}

// registrationStopTimeout bounds the stop; registration calls are short.
const registrationStopTimeout = time.Second

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
	if s.opts.Registered != nil {
		s.opts.Registered(st.GetPluginRegistered())
	}
	if st.GetPluginRegistered() {
		klog.InfoS("Kubelet registered the CSI driver", "driver", s.opts.DriverName)
	} else {
		klog.ErrorS(errors.New(st.GetError()), "Kubelet failed to register the CSI driver", "driver", s.opts.DriverName)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
