//go:build tools

// Package tools pins the oldest Kubernetes the agent supports (the e2e smoke
// on it); see ../tools for the current one.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
