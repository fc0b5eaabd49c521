#!/usr/bin/env bash
# The Helm chart: helm lint --strict and helm template for the default values and each example
# combination, checks over the rendered manifests (chart_check.py), and deploy/ equal to a fresh
# render.
source "$(dirname "$0")/lib.sh"
CHART="$REPO_DIR/charts/csi-interposer"
command -v helm >/dev/null || die "helm is not installed; run e2e/install-deps"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name:helm arguments; the chart has no icon, which --strict reports as INFO only.
combos=(
  "default:"
  "chaos-throttled:--set storageClasses.chaos.enabled=true --set storageClasses.throttled.enabled=true"
  "external-collector:--set jaeger.enabled=false --set tracing.otlpEndpoint=http://otel-collector.monitoring:4317"
  "servicemonitor-no-dashboard:--set metrics.serviceMonitor.enabled=true --set grafana.dashboard.enabled=false"
)
rendered=()
for c in "${combos[@]}"; do
  name=${c%%:*}
  args=${c#*:}
  log "helm lint --strict ($name)"
  # shellcheck disable=SC2086
  helm lint --strict --kube-version v1.34.0 "$CHART" $args >/dev/null || { helm lint --strict --kube-version v1.34.0 "$CHART" $args; die "helm lint failed for $name"; }
  # shellcheck disable=SC2086
  helm template csi-interposer "$CHART" --namespace csi-interposer --kube-version v1.34.0 $args >"$work/$name.yaml" || die "helm template failed for $name"
  rendered+=("$work/$name.yaml")
done
python3 "$E2E_DIR/chart_check.py" "${rendered[@]}"
"$E2E_DIR/render-deploy" "$work/deploy.yaml"
diff -u "$REPO_DIR/deploy/csi-interposer.yaml" "$work/deploy.yaml" || die "deploy/csi-interposer.yaml is stale: run e2e/render-deploy"
echo "chart: deploy/ equals a fresh render"
