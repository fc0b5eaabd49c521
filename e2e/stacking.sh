#!/usr/bin/env bash
# Stacked volumes against a real Kubernetes API (e2e/k8s-lib.sh): a lower CSI driver
# (csi-interposer itself in `dir` mode with no layers, registered as lower.csi.dev) with its own
# external-provisioner, and csi-interposer with `backend: pvc` on top of it with its own.
# stacking_check.py runs the scenarios: provisioning through both provisioners, data written
# through our mount found in the lower volume's directory, live tuning from claim annotations,
# static wrapping of an existing claim, the failure cases, and a clean teardown.
source "$(dirname "$0")/lib.sh"
source "$E2E_DIR/k8s-lib.sh"
require_root
DRIVER="$REPO_DIR/target/release/csi-interposer"
[ -x "$DRIVER" ] || die "$DRIVER is not built; run cargo build --release"
[ -x "$CSI_PROVISIONER_BIN" ] || die "$CSI_PROVISIONER_BIN is missing; run e2e/install-deps"

work=$(mktemp -d /var/tmp/stacking.XXXXXX)
chmod 755 "$work"
pids=()
finish() {
  local status=$?
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  # Every daemon and mount of this run lives under $work (both drivers' volumes).
  pkill -TERM -f "interposer-fs $work/" 2>/dev/null || true
  pkill -TERM -f "csi-interposer .*$work/" 2>/dev/null || true
  sleep 0.5
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
  pkill -KILL -f "interposer-fs $work/" 2>/dev/null || true
  # Deepest first: our mounts sit on the lower ones.
  for m in $(awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
  if [ "$status" != 0 ]; then
    for f in "$work"/*.log; do [ -f "$f" ] && { printf '\n--- tail of %s ---\n' "$f" >&2; tail -n 30 "$f" >&2; }; done
  fi
  k8s_down "$status"
  rm -rf "$work"
}
trap finish EXIT

k8s_up "$work/k8s"
kubectl create namespace csi-interposer >/dev/null
kubectl create namespace team >/dev/null

plugins=$work/plugins
mkdir -p "$plugins/lower.csi.dev" "$plugins/interposer.csi.dev"

# start NAME COMMAND...: a background process of this run, output to $work/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
}
wait_for_socket() {
  for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  die "no socket at $1"
}

log "lower driver (lower.csi.dev, dir backend) and its provisioner"
start lower-driver "$DRIVER" --driver-name lower.csi.dev --node-id node-a --mode all \
  --endpoint "unix://$plugins/lower.csi.dev/csi.sock" \
  --state-dir "$work/lower/state" --data-dir "$work/lower/data"
wait_for_socket "$plugins/lower.csi.dev/csi.sock"
start lower-provisioner "$CSI_PROVISIONER_BIN" --csi-address "$plugins/lower.csi.dev/csi.sock" \
  --kubeconfig "$KUBECONFIG" --leader-election=false --timeout 30s --v 2

log "csi-interposer (interposer.csi.dev, pvc backend) and its provisioner"
start driver env KUBECONFIG="$KUBECONFIG" "$DRIVER" --driver-name interposer.csi.dev --node-id node-a --mode all \
  --endpoint "unix://$plugins/interposer.csi.dev/csi.sock" \
  --state-dir "$work/ours/state" --data-dir "$work/ours/data" \
  --namespace csi-interposer --plugins-dir "$plugins" --lower-dir "$work/ours/lower"
wait_for_socket "$plugins/interposer.csi.dev/csi.sock"
start provisioner "$CSI_PROVISIONER_BIN" --csi-address "$plugins/interposer.csi.dev/csi.sock" \
  --kubeconfig "$KUBECONFIG" --leader-election=false --timeout 30s --extra-create-metadata --v 2

# What kubelet's plugin registration would make: the node, labelled with the drivers' topology
# segment, and its CSINode listing both drivers (external-provisioner reads topology there).
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {interposer.csi.dev/node: node-a}}
---
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata: {name: node-a}
spec:
  drivers:
  - {name: lower.csi.dev, nodeID: node-a, topologyKeys: [interposer.csi.dev/node]}
  - {name: interposer.csi.dev, nodeID: node-a, topologyKeys: [interposer.csi.dev/node]}
---
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {name: lower.csi.dev}
spec: {attachRequired: false, podInfoOnMount: false, volumeLifecycleModes: [Persistent]}
---
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {name: interposer.csi.dev}
spec: {attachRequired: false, podInfoOnMount: true, volumeLifecycleModes: [Persistent, Ephemeral]}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: lower}
provisioner: lower.csi.dev
parameters: {layers: ""}
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: stacked}
provisioner: interposer.csi.dev
parameters: {backend: pvc, backingStorageClass: lower, layers: "metrics,fault,throttle"}
reclaimPolicy: Delete
volumeBindingMode: Immediate
YAML

WORK=$work DRIVER=$DRIVER CTL="$REPO_DIR/target/release/csi-interposer-ctl" PLUGINS=$plugins \
  python3 "$E2E_DIR/stacking_check.py"
