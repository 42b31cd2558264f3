package main

import (
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"

	"github.com/csi-agent/csi-agent/internal/clusterca"
	"github.com/csi-agent/csi-agent/internal/config"
)

// newClusterCA is cluster mode's client of the API server (ca.cluster).
func newClusterCA(cfg config.Config, td spiffeid.TrustDomain) (*clusterca.Client, error) {
	rc, err := clusterca.RESTConfig(cfg.CA.Cluster.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("ca.cluster.kubeconfig: %w", err)
	}
	rc.UserAgent = "csi-agent/" + cfg.NodeName
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("ca.cluster: %w", err)
	}
	return clusterca.New(cs, cfg.ClusterCAOptions(td))
}
