package workloadapi

import (
	"net"
	"path/filepath"

	"github.com/csi-agent/csi-agent/internal/unixsock"
)

// ErrSocketInUse means another live process serves the socket.
var ErrSocketInUse = unixsock.ErrInUse

// Listen creates dir (0755, so pods can traverse it) and a world-connectable
// Unix socket in it. Attestation, not file permissions, decides who gets an
// identity. A stale socket file left by a dead agent is replaced; a socket a
// live process answers on is never taken over (see unixsock.Listen).
func Listen(dir, name string) (*net.UnixListener, error) {
	return unixsock.Listen(filepath.Join(dir, name), 0o777, 0o755)
}
