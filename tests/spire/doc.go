// Package spire proves federation with a real SPIRE deployment: it builds
// spire-server and spire-agent from the tools module (cached by version,
// like the e2e suite's kubelet) and the agent from this repository, runs
// them on loopback and Unix sockets, and federates the two trust domains
// through their bundle endpoints in both directions. Run it with
// `make spire-interop`.
package spire
