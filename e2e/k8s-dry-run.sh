#!/usr/bin/env bash
# The Helm chart against a real kube-apiserver (e2e/k8s-lib.sh): every combination that
# e2e/chart.sh renders (e2e/chart-combos.sh), deploy/ and deploy/examples/ go through
# `kubectl apply --dry-run=server --validate=strict --warnings-as-errors`, so the API server's
# own validation, defaulting, admission and RBAC checks see each object without storing it.
# The namespace is created for real, and the ServiceMonitor CRD is the real one from the pinned
# prometheus-operator release, so ServiceMonitor objects are checked against its schema.
source "$(dirname "$0")/lib.sh"
source "$E2E_DIR/k8s-lib.sh"
source "$E2E_DIR/chart-combos.sh"
PROMETHEUS_OPERATOR_VERSION=v0.85.0
command -v helm >/dev/null || die "helm is not installed; run e2e/install-deps"

work=$(mktemp -d)
trap 'k8s_down $?; rm -rf "$work"' EXIT

# The CRD from the prometheus-operator Go module (the module cache keeps it after the first time).
po_dir=$(cd "$work" && go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
  python3 -c 'import json, sys; m = json.load(sys.stdin); print(m.get("Dir") or sys.exit(m.get("Error", "no Dir")))') ||
  die "go mod download prometheus-operator@$PROMETHEUS_OPERATOR_VERSION failed"
crd="$po_dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
[ -f "$crd" ] || die "$crd is missing"

k8s_up "$work/k8s"
kubectl create namespace csi-interposer >/dev/null
kubectl create namespace team >/dev/null # deploy/examples/pv-wrap-existing-claim.yaml's
# create, not apply: the CRD is larger than apply's last-applied annotation may be.
kubectl create -f "$crd" >/dev/null
kubectl wait --for condition=Established --timeout 30s crd/servicemonitors.monitoring.coreos.com >/dev/null
kubectl wait --for jsonpath='{.metadata.name}'=default --timeout 30s -n csi-interposer serviceaccount/default >/dev/null

# dry_run FILE LABEL: every object in FILE must be accepted, and kubectl must report each one.
total=0
files=0
dry_run() {
  local file=$1 label=$2 want got out
  want=$(python3 -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$file")
  [ "$want" -gt 0 ] || die "$label: no objects in $file"
  out=$(kubectl apply --dry-run=server --validate=strict --warnings-as-errors -o name -f "$file" 2>&1) || {
    printf '%s\n' "$out" >&2
    die "$label: kube-apiserver rejected an object"
  }
  got=$(printf '%s\n' "$out" | grep -c . || true)
  [ "$got" = "$want" ] || { printf '%s\n' "$out" >&2; die "$label: $got of $want objects reported"; }
  echo "dry-run: $label: $got objects accepted"
  total=$((total + got))
  files=$((files + 1))
}

for c in "${CHART_COMBOS[@]}"; do
  name=${c%%:*}
  chart_render "$c" "$work/$name.yaml" || die "helm template failed for $name"
  dry_run "$work/$name.yaml" "chart ($name)"
done
for f in "$REPO_DIR"/deploy/*.yaml "$REPO_DIR"/deploy/examples/*.yaml; do
  dry_run "$f" "${f#"$REPO_DIR"/}"
done

[ "$total" -gt 0 ] || die "no object was checked"
echo "dry-run: $total objects in $files files accepted by kube-apiserver $KUBERNETES_VERSION"
