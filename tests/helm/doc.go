// Package helm tests the Helm chart deploy/helm/csi-agent: it lints and
// renders the chart with Helm's own Go packages and checks the output
// against the Kustomize manifests of deploy/kind, object for object.
package helm
