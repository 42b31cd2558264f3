#!/usr/bin/env bash
# `make kind-e2e`: csi-agent on a kind cluster, installed from deploy/kind the
# way a user installs it, then the same cases as the hermetic e2e
# (tests/e2e, in kind mode). Needs Docker, kind, kubectl, Go and network
# access for the kind node image; it cannot run on a machine without them.
#
# Env: KIND_CLUSTER_NAME (default csi-agent-e2e); KIND_NODE_IMAGE to pin the
# node image; KEEP_CLUSTER=1 keeps the cluster afterwards.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster=${KIND_CLUSTER_NAME:-csi-agent-e2e}
start=$(date +%s)

for tool in docker kind kubectl go; do
	command -v "$tool" >/dev/null || { echo "kind-e2e: needs $tool" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "kind-e2e: no Docker daemon reachable" >&2; exit 1; }

work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
cleanup() {
	status=$?
	if [ $status -ne 0 ]; then
		echo "kind-e2e: failed; agent logs:" >&2
		kubectl -n csi-agent logs -l app.kubernetes.io/name=csi-agent --tail=100 >&2 || true
	fi
	if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
		echo "kind-e2e: cluster $cluster kept (KUBECONFIG=$KUBECONFIG)"
	else
		kind delete cluster --name "$cluster" || true
		rm -rf "$work"
	fi
}
trap cleanup EXIT

image_flag=()
[ -n "${KIND_NODE_IMAGE:-}" ] && image_flag=(--image "$KIND_NODE_IMAGE")
kind create cluster --name "$cluster" --config "$root/deploy/kind/kind-config.yaml" "${image_flag[@]}" --wait 180s

# Images from source, as in the hermetic e2e: csi-agent:dev, csi-agent-workload:dev.
(cd "$root/tests/e2e" && go run ./cmd/e2e-images -repo "$root" -out "$work/images.tar")
kind load image-archive "$work/images.tar" --name "$cluster"

# Install as a user would; server-side apply validates the schema.
kubectl apply --server-side -k "$root/deploy/kind"
kubectl -n csi-agent rollout status daemonset/csi-agent --timeout=180s

# The example workload gets its SVID.
kubectl apply --server-side -k "$root/deploy/kind/example"
kubectl -n demo rollout status deployment/spiffe-demo --timeout=180s
for i in $(seq 60); do
	if kubectl -n demo logs deployment/spiffe-demo 2>/dev/null | grep -q '"event":"x509"'; then
		kubectl -n demo logs deployment/spiffe-demo | grep '"event":"x509"' | head -1
		break
	fi
	[ "$i" = 60 ] && { echo "kind-e2e: the example workload got no SVID" >&2; kubectl -n demo logs deployment/spiffe-demo >&2 || true; exit 1; }
	sleep 2
done
# Its namespace and service account stay: the e2e runs its pod template too.
kubectl -n demo delete deployment spiffe-demo --wait

# The e2e cases, against this cluster (single node: the control plane).
(cd "$root/tests/e2e" && CSI_AGENT_E2E_KIND_NODE="$cluster-control-plane" go test -count=1 -v -timeout 30m .)
echo "kind-e2e: passed in $(( $(date +%s) - start ))s"
