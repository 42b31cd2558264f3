package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
)

// nodeServer is the CSI Node service: each method converts the request, calls
// the Driver's plain function and converts the answer or the error.
type nodeServer struct {
	csipb.UnimplementedNodeServer
	d *Driver
}

func (s nodeServer) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: s.d.nodeID}, nil
}

func (s nodeServer) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	caps := []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		nodeVolumeConditionCapa,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	}
	resp := &csipb.NodeGetCapabilitiesResponse{}
	for _, c := range caps {
		resp.Capabilities = append(resp.Capabilities, &csipb.NodeServiceCapability{
			Type: &csipb.NodeServiceCapability_Rpc{Rpc: &csipb.NodeServiceCapability_RPC{Type: c}},
		})
	}
	return resp, nil
}

func (s nodeServer) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	p, err := validatePublish(req)
	if err == nil && !s.d.ready() {
		// A pod given the directory now would find no socket in it.
		err = unavailablef("the Workload API socket is not served right now (agent starting, or the socket is being re-created); retry")
	}
	if err == nil {
		err = s.d.publish(p)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

func (s nodeServer) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	if err := s.d.unpublish(req.GetVolumeId(), req.GetTargetPath()); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

func (s nodeServer) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	c, err := s.d.volumeStats(req.GetVolumeId(), req.GetVolumePath())
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &csipb.NodeGetVolumeStatsResponse{}
	if !c.abnormal {
		resp.Usage = usage(c.real)
	}
	setVolumeCondition(resp, c.abnormal, c.message)
	return resp, nil
}

func (s nodeServer) NodeGetVolumeHealth(ctx context.Context, req *csipb.NodeGetVolumeHealthRequest) (*csipb.NodeGetVolumeHealthResponse, error) {
	c, err := s.d.checkVolume(req.GetVolumeId(), req.GetVolumePublishPath())
	if err != nil {
		return nil, toStatus(err)
	}
	h := &csipb.VolumeHealth{VolumeId: req.GetVolumeId()}
	if c.abnormal {
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status:  csipb.VolumeHealthErrorType_INACCESSIBLE,
			Reason:  c.reason,
			Message: c.message,
		}}
	}
	return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}
