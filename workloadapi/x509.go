package workloadapi

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"strings"

	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-agent/csi-agent/internal/rules"
	"github.com/csi-agent/csi-agent/internal/svidcache"
)

// FetchX509SVID streams the caller's X.509-SVIDs: at once, then whenever
// one of them rotates, a bundle changes or the rules change.
func (s *Server) FetchX509SVID(_ *workloadpb.X509SVIDRequest, stream grpc.ServerStreamingServer[workloadpb.X509SVIDResponse]) error {
	ctx := stream.Context()
	// Subscribed before anything is read, so that no change slips between.
	sub := s.svids.Subscribe()
	defer sub.Close()
	var (
		last *workloadpb.X509SVIDResponse
		sent map[string]bool // serials in the last message
	)
	for {
		wait := s.nextChange(sub)
		// Attest again at every change: a stream must stop the moment its
		// caller is gone or no longer entitled (pod relabelled, volume
		// unpublished, rules reloaded), not keep receiving rotated keys.
		c, err := s.attest(ctx)
		if err != nil {
			return err
		}
		ids, err := s.entitled(c)
		if err != nil {
			if last != nil {
				klog.InfoS("X.509-SVIDs revoked for caller; stream ended", "pid", c.pid, "err", err)
			}
			return err
		}
		// Watch what this caller holds before reading it: a renewal of
		// those, and only those, wakes this stream.
		sub.Watch(x509Keys(ids))
		resp, issued, err := s.x509Response(ctx, ids, sub.X509SVID)
		if err != nil {
			return err
		}
		// The audit line: one per mint, naming the caller that caused it.
		// Renewals ahead of demand are audited by the cache.
		for _, iss := range issued {
			if iss.minted {
				klog.InfoS("Issued X.509-SVID", "spiffe_id", iss.id, "serial", iss.serial, "expires", iss.expires, "pid", c.pid, "attributes", c.attrs.String())
			}
		}
		if last == nil || !sameX509Response(last, resp) {
			if err := stream.Send(resp); err != nil {
				return err
			}
			now := make(map[string]bool, len(issued))
			for _, iss := range issued {
				now[iss.serial] = true
				if !iss.minted && !sent[iss.serial] {
					klog.V(1).InfoS("Sent X.509-SVID", "spiffe_id", iss.id, "serial", iss.serial, "expires", iss.expires, "pid", c.pid, "attributes", c.attrs.String())
				}
			}
			last, sent = resp, now
		}
		if !wait(ctx) {
			return nil
		}
	}
}

func x509Keys(ids []rules.Identity) []svidcache.X509Key {
	keys := make([]svidcache.X509Key, len(ids))
	for i, id := range ids {
		keys[i] = svidcache.X509Key{ID: id.ID, DNSNames: id.DNSNames}
	}
	return keys
}

type issuedSVID struct {
	id, serial, expires string
	minted              bool // by this call
}

// x509Fetch reads an X.509-SVID from the cache (through a stream's
// subscription, so that its own mint does not wake it).
type x509Fetch func(ctx context.Context, id spiffeid.ID, dnsNames []string) (*x509svid.SVID, bool, error)

func (s *Server) x509Response(ctx context.Context, ids []rules.Identity, fetch x509Fetch) (*workloadpb.X509SVIDResponse, []issuedSVID, error) {
	own := s.bundle.Bundle()
	ownDER := concatDER(own.X509Authorities())
	resp := &workloadpb.X509SVIDResponse{Svids: make([]*workloadpb.X509SVID, 0, len(ids))}
	issued := make([]issuedSVID, 0, len(ids))
	for _, id := range ids {
		svid, minted, err := fetch(ctx, id.ID, id.DNSNames)
		if err != nil {
			klog.ErrorS(err, "Minting X.509-SVID failed", "spiffe_id", id.ID.String())
			return nil, nil, status.Errorf(codes.Unavailable, "could not mint X.509-SVID for %s: %v", id.ID, err)
		}
		enc, err := s.encode(id.ID.String(), id.DNSNames, svid)
		if err != nil {
			return nil, nil, status.Errorf(codes.Internal, "encode SVID: %v", err)
		}
		resp.Svids = append(resp.Svids, &workloadpb.X509SVID{
			SpiffeId:    id.ID.String(),
			X509Svid:    enc.chain,
			X509SvidKey: enc.key,
			Bundle:      ownDER,
			Hint:        id.Hint,
		})
		iss := enc.issued
		iss.minted = minted
		issued = append(issued, iss)
	}
	resp.FederatedBundles = s.federatedX509(ids)
	return resp, issued, nil
}

// maxEncoded bounds the wire-form cache: far above the identities one node
// serves at a time.
const maxEncoded = 4096

type encodedSVID struct {
	svid   *x509svid.SVID
	chain  []byte // DER certificates, leaf first
	key    []byte // PKCS#8
	issued issuedSVID
}

// encode returns the wire form of svid, encoding it only when the cache
// handed out a new SVID for this ID and DNS names.
func (s *Server) encode(id string, dns []string, svid *x509svid.SVID) (encodedSVID, error) {
	k := id
	if len(dns) > 0 {
		k += "\x00" + strings.Join(dns, "\x00")
	}
	s.encMu.RLock()
	e, ok := s.encoded[k]
	s.encMu.RUnlock()
	if ok && e.svid == svid {
		return e, nil
	}
	key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return encodedSVID{}, err
	}
	leaf := svid.Certificates[0]
	e = encodedSVID{svid: svid, chain: concatDER(svid.Certificates), key: key, issued: issuedSVID{
		id: id, serial: hex.EncodeToString(leaf.SerialNumber.Bytes()), expires: leaf.NotAfter.UTC().Format("2006-01-02T15:04:05Z"),
	}}
	s.encMu.Lock()
	if len(s.encoded) >= maxEncoded {
		// Identities come and go with pods; drop the lot rather than keep
		// keys of workloads long gone. Re-encoding is cheap.
		clear(s.encoded)
	}
	s.encoded[k] = e // replaces the rotated one: one entry per identity
	s.encMu.Unlock()
	return e, nil
}

func sameX509Response(a, b *workloadpb.X509SVIDResponse) bool {
	if len(a.Svids) != len(b.Svids) || len(a.FederatedBundles) != len(b.FederatedBundles) {
		return false
	}
	for i := range a.Svids {
		x, y := a.Svids[i], b.Svids[i]
		if x.SpiffeId != y.SpiffeId || x.Hint != y.Hint || !bytes.Equal(x.X509Svid, y.X509Svid) || !bytes.Equal(x.Bundle, y.Bundle) {
			return false
		}
	}
	return sameBundleMap(a.FederatedBundles, b.FederatedBundles)
}

func sameBundleMap(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

func concatDER(certs []*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, c.Raw...)
	}
	return b
}
