package framework

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// The spiffe-csi run mode (run.sh --spiffe-csi): the node runs deploy/kind
// with components/spiffe-csi, and the vendored spiffe-csi workload
// manifest runs on it unchanged.
const (
	// ComponentEnv names a deploy/kind component to run with when
	// Options.Component is empty (run.sh sets it for its modes).
	ComponentEnv = "CSI_AGENT_E2E_COMPONENT"
	// SpiffeCSIComponent is the drop-in for spiffe-csi.
	SpiffeCSIComponent = "spiffe-csi"
	// SpiffeCSIWorkloadImage is the image spiffe-csi's example workload
	// manifest names (imagePullPolicy Never): the test workload, watching.
	SpiffeCSIWorkloadImage = "spiffe-csi-driver-example-workload:example"

	// podBridge is the pod network of that mode: the manifest has no
	// hostNetwork, and containerd needs an eth0 with an address for a pod
	// with its own network. The bridge has no address on the host, no
	// route out and no masquerade: nothing leaves it.
	podBridge = "csie2e0"
	podSubnet = "10.254.254.0/24"
)

// Driver is the CSI driver name the node's CSIDriver object has.
func (n *Local) Driver() string {
	if o, err := findKind(n.objs, "CSIDriver"); err == nil {
		return o.GetName()
	}
	return DriverName
}

// writePodNetwork gives pods with their own network namespace an isolated
// network, in the modes that run such pods; before containerd starts.
func (n *Local) writePodNetwork() error {
	if n.opts.Component != SpiffeCSIComponent {
		return nil
	}
	conf := fmt.Sprintf(`{"cniVersion":"0.4.0","name":"e2e-pods","plugins":[{"type":"bridge","bridge":%q,"isGateway":false,"ipMasq":false,`+
		`"ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"dataDir":%q}}]}`, podBridge, podSubnet, filepath.Join(n.d.cni, "ipam"))
	// Sorted before the loopback one: containerd takes the first network.
	return os.WriteFile(filepath.Join(n.d.cni, "05-pods.conflist"), []byte(conf), 0o644)
}

// removePodBridge deletes the bridge the pod network made, if any.
func removePodBridge() error {
	if _, err := net.InterfaceByName(podBridge); err != nil {
		return nil
	}
	if out, err := exec.Command("ip", "link", "del", podBridge).CombinedOutput(); err != nil {
		return fmt.Errorf("ip link del %s: %v: %s", podBridge, err, out)
	}
	return nil
}

// findKind returns the first object of the kind.
func findKind(objs []*unstructured.Unstructured, kind string) (*unstructured.Unstructured, error) {
	for _, o := range objs {
		if o.GetKind() == kind {
			return o, nil
		}
	}
	return nil, fmt.Errorf("no %s in the manifests", kind)
}

// servesPodCertificates tells whether the API server serves
// certificates.k8s.io/v1 PodCertificateRequests (v1.37 on).
func (n *Local) servesPodCertificates() bool {
	l, err := n.Client.Discovery().ServerResourcesForGroupVersion("certificates.k8s.io/v1")
	if err != nil {
		return false
	}
	for _, r := range l.APIResources {
		if r.Name == "podcertificaterequests" {
			return true
		}
	}
	return false
}
