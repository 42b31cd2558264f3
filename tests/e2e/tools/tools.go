//go:build tools

// Package tools pins the Kubernetes components the e2e builds from source:
// no registry or release download is reachable, the Go module proxy is.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
