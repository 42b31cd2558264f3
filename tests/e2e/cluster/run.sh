#!/usr/bin/env bash
# Cluster mode against a real kube-apiserver (`make cluster-e2e`): etcd and
# kube-apiserver on loopback (ports 19443, 25379-25381), two controller
# replicas and two node agents as host processes, the cases of issue 8.
# Needs root (the agents serve Unix sockets the test attests as uid 0).
#
# Env: CSI_AGENT_REQUIRE_ROOT_TESTS=1 turns "cannot run" into a failure;
# CSI_AGENT_CLUSTER_BASE (default /var/lib/csi-agent-cluster-test) holds it all;
# CSI_AGENT_CLUSTER_ARTIFACTS receives logs of a failed run.
# Extra arguments go to the test binary, e.g. -test.run TestLeader.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$(date +%s)

if [ "$(id -u)" != 0 ]; then
	if [ "${CSI_AGENT_REQUIRE_ROOT_TESTS:-}" = 1 ]; then
		echo "cluster-e2e: needs root, and CSI_AGENT_REQUIRE_ROOT_TESTS=1 forbids skipping" >&2
		exit 1
	fi
	echo "cluster-e2e: SKIP (needs root)"
	exit 0
fi
if ! command -v etcd >/dev/null; then
	echo "cluster-e2e: installing etcd-server"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi

cd "$here"
work=$(mktemp -d)
# The test binary can also only tear down, for when go test itself dies.
go test -c -o "$work/cluster.test" .
cleanup() {
	"$work/cluster.test" -cluster.cleanup || echo "cluster-e2e: teardown left something behind, see above" >&2
	rm -rf "$work"
}
trap cleanup EXIT

status=0
go test -count=1 -v -timeout 20m . -args "$@" || status=$?
echo "cluster-e2e: wall time $(( $(date +%s) - start ))s (status $status)"
exit $status
