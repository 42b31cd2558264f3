package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"google.golang.org/grpc/credentials"
	grpcpeer "google.golang.org/grpc/peer"
)

// AuthType is the AuthInfo type reported by Credentials.
const AuthType = "peercred"

// AuthInfo is what Credentials attaches to each connection.
type AuthInfo struct {
	credentials.CommonAuthInfo
	Info Info
}

// AuthType implements credentials.AuthInfo.
func (AuthInfo) AuthType() string { return AuthType }

// Credentials returns gRPC server transport credentials for Unix sockets. The
// handshake reads the peer's credentials and takes a handle on its process;
// handlers get them with FromContext. The handle is released when the
// connection closes. A connection over limits is refused at the handshake.
// Client handshakes are not supported.
func Credentials(limits Limits) credentials.TransportCredentials {
	return &transportCreds{kind: handleAuto, adm: newAdmission(limits)}
}

type transportCreds struct {
	kind handleKind
	adm  *admission
}

func (c *transportCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peer credentials: client handshake not supported")
}

func (c *transportCreds) ServerHandshake(rawConn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	sc, ok := rawConn.(syscall.Conn)
	if la := rawConn.LocalAddr(); !ok || la == nil || la.Network() != "unix" {
		return nil, nil, fmt.Errorf("peer credentials: %T is not a Unix socket", rawConn)
	}
	info, err := fromConn(sc, c.kind)
	if err != nil {
		return nil, nil, err
	}
	if c.adm != nil {
		if info.slot, err = c.adm.admit(info, rawConn.Close); err != nil {
			info.Close()
			return nil, nil, err
		}
	}
	// Closing the raw connection makes gRPC tear the transport down; the
	// wrapper's Close still releases the process handle afterwards.
	info.closeConn = rawConn.Close
	ai := AuthInfo{
		// No encryption; the socket never leaves the node.
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		Info:           info,
	}
	return &conn{Conn: rawConn, info: info}, ai, nil
}

func (c *transportCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: AuthType}
}

func (c *transportCreds) Clone() credentials.TransportCredentials {
	cc := *c
	return &cc
}

// OverrideServerName is meaningless here; kept for the interface.
func (c *transportCreds) OverrideServerName(string) error { return nil }

// conn releases the process handle with the connection.
type conn struct {
	net.Conn
	info Info
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.info.Close()
	c.info.slot.release()
	return err
}

// FromContext returns the peer Info of a gRPC call served with Credentials.
func FromContext(ctx context.Context) (Info, bool) {
	p, ok := grpcpeer.FromContext(ctx)
	if !ok || p == nil {
		return Info{}, false
	}
	switch ai := p.AuthInfo.(type) {
	case AuthInfo:
		return ai.Info, true
	case *AuthInfo:
		if ai != nil {
			return ai.Info, true
		}
	}
	return Info{}, false
}
