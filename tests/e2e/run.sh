#!/usr/bin/env bash
# Hermetic local-node e2e (`make e2e`): a real single-node Kubernetes on
# loopback (etcd, kube-apiserver and kubelet built from source, containerd,
# runc), the agent as a static pod made from deploy/kind's DaemonSet, and
# the cases of tests/e2e run against it. Needs root; leaves the machine as
# it found it, also when a case fails or the run is interrupted.
#
# Env: CSI_AGENT_REQUIRE_ROOT_TESTS=1 turns "cannot run" into a failure;
# CSI_AGENT_E2E_BASE (default /var/lib/csi-agent-e2e) holds the node;
# CSI_AGENT_E2E_ARTIFACTS receives logs of a failed run;
# CSI_AGENT_E2E_RESULTS appends the latency measurement to a file.
# Extra arguments go to the test binary, e.g. -test.run TestPodGets.
# --oldest (first argument): the smoke on the oldest supported Kubernetes
# (tools-oldest/go.mod): one pod gets its SVID, on a node of that version.
# --spiffe-csi (first argument): deploy/kind with components/spiffe-csi, and
# spiffe-csi's own example workload manifest, unchanged, gets its SVID.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$(date +%s)
label=current
if [ "${1:-}" = --oldest ]; then
	shift
	label=oldest
	set -- -e2e.tools=tools-oldest -test.run '^TestPodGetsIdentityFromCSIVolume$' "$@"
elif [ "${1:-}" = --spiffe-csi ]; then
	shift
	label=spiffe-csi
	export CSI_AGENT_E2E_COMPONENT=spiffe-csi
	set -- -test.run '^TestSpiffeCSIManifestRunsUnchanged$' "$@"
fi

if [ "$(id -u)" != 0 ]; then
	if [ "${CSI_AGENT_REQUIRE_ROOT_TESTS:-}" = 1 ]; then
		echo "e2e: needs root, and CSI_AGENT_REQUIRE_ROOT_TESTS=1 forbids skipping" >&2
		exit 1
	fi
	echo "e2e: SKIP (needs root)"
	exit 0
fi

# Host packages the node runs (Debian names). Nothing else is downloaded:
# Kubernetes is built from the Go module proxy, images from source.
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
	echo "e2e: installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cd "$here"
work=$(mktemp -d)
# The test binary can also only tear down, for when go test itself dies
# (its -timeout panics without running deferred teardown).
go test -c -o "$work/e2e.test" .
cleanup() {
	"$work/e2e.test" -e2e.cleanup || echo "e2e: teardown left something behind, see above" >&2
	rm -rf "$work"
}
trap cleanup EXIT

status=0
go test -count=1 -v -timeout 35m . -args "$@" || status=$?
echo "e2e ($label): wall time $(( $(date +%s) - start ))s (status $status)"
exit $status
