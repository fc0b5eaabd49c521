#!/usr/bin/env bash
# The Helm chart: helm lint --strict and helm template for the default values and each example
# combination (e2e/chart-combos.sh), checks over the rendered manifests (chart_check.py), and
# deploy/ equal to a fresh render.
source "$(dirname "$0")/lib.sh"
source "$E2E_DIR/chart-combos.sh"
command -v helm >/dev/null || die "helm is not installed; run e2e/install-deps"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rendered=()
for c in "${CHART_COMBOS[@]}"; do
  name=${c%%:*}
  args=${c#*:}
  log "helm lint --strict ($name)"
  # shellcheck disable=SC2086
  helm lint --strict --kube-version "$CHART_KUBE_VERSION" "$CHART" $args >/dev/null || { helm lint --strict --kube-version "$CHART_KUBE_VERSION" "$CHART" $args; die "helm lint failed for $name"; }
  chart_render "$c" "$work/$name.yaml" || die "helm template failed for $name"
  rendered+=("$work/$name.yaml")
done
python3 "$E2E_DIR/chart_check.py" "${rendered[@]}"
"$E2E_DIR/render-deploy" "$work/deploy.yaml"
diff -u "$REPO_DIR/deploy/csi-interposer.yaml" "$work/deploy.yaml" || die "deploy/csi-interposer.yaml is stale: run e2e/render-deploy"
echo "chart: deploy/ equals a fresh render"
