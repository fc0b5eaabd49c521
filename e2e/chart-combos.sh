# The Helm chart's value combinations the suites render, in one place: e2e/chart.sh lints and
# checks each, e2e/k8s-dry-run.sh sends each to a real kube-apiserver. Sourced after lib.sh.

CHART="$REPO_DIR/charts/csi-interposer"
CHART_KUBE_VERSION=v1.34.0

# name:helm arguments; the chart has no icon, which --strict reports as INFO only.
CHART_COMBOS=(
  "default:"
  "chaos-throttled:--set storageClasses.chaos.enabled=true --set storageClasses.throttled.enabled=true"
  "external-collector:--set jaeger.enabled=false --set tracing.otlpEndpoint=http://otel-collector.monitoring:4317"
  "servicemonitor-no-dashboard:--set metrics.serviceMonitor.enabled=true --set grafana.dashboard.enabled=false"
  "fuse-uring:--set node.fuseUring=true"
  "stacked-central-controller:--set controller.enabled=true --set storageClasses.stacked.enabled=true --set storageClasses.stacked.backingStorageClass=standard"
)

# chart_render COMBO OUT: helm template for one CHART_COMBOS entry, into OUT.
chart_render() {
  local args=${1#*:}
  # shellcheck disable=SC2086
  helm template csi-interposer "$CHART" --namespace csi-interposer --kube-version "$CHART_KUBE_VERSION" $args >"$2"
}
