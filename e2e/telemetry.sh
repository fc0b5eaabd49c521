#!/usr/bin/env bash
# Telemetry end to end against the real backends: Jaeger (all-in-one, OTLP/gRPC 4317, query
# 16686) and Prometheus (Debian) scraping the node plugin's one /metrics. A volume is provisioned
# and published through the CSI API with trace, metrics, fault and throttle; telemetry_check.py
# runs the workload and the assertions (see its docstring).
source "$(dirname "$0")/lib.sh"
require_root
JAEGER_BIN=$("$E2E_DIR/install-deps" --print-jaeger)
[ -x "$JAEGER_BIN" ] || die "jaeger is not built ($JAEGER_BIN); run e2e/install-deps"
command -v prometheus >/dev/null || die "prometheus is not installed; run e2e/install-deps"
DRIVER="$REPO_DIR/target/release/csi-interposer"
CTL="$REPO_DIR/target/release/csi-interposer-ctl"

work=$(mktemp -d /var/tmp/telemetry.XXXXXX)
chmod 755 "$work"
pids=()
volume_id=""
finish() {
  if [ -n "$volume_id" ]; then
    "$CTL" --endpoint "unix://$work/csi.sock" down "$volume_id" --staging "$work/staging" --target "$work/target" || true
  fi
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  pkill -TERM -f "$JAEGER_BIN" 2>/dev/null || true
  sleep 0.5
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
  pkill -KILL -f "$JAEGER_BIN" 2>/dev/null || true
  pkill -f "interposer-fs $work/" 2>/dev/null || true
  for m in $(awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts); do umount -l "$m" || true; done
  rm -rf "$work"
}
trap finish EXIT

for port in 4317 16686 19090 19808; do
  ss -ltn "sport = :$port" | grep -q LISTEN && die "port $port is in use; stop what listens there"
done

log "starting Jaeger ($JAEGER_BIN)"
start_jaeger="cd $work && echo \$\$ >$work/jaeger.pid && exec $JAEGER_BIN >>$work/jaeger.log 2>&1"
bash -c "$start_jaeger" &
disown
for _ in $(seq 1 200); do curl -sf http://127.0.0.1:16686/api/services >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:16686/api/services >/dev/null || { tail -20 "$work/jaeger.log"; die "Jaeger did not start"; }

log "starting the driver (node metrics on 127.0.0.1:19808)"
OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 RUST_LOG=info "$DRIVER" --endpoint "unix://$work/csi.sock" \
  --node-id telemetry-node --state-dir "$work/state" --data-dir "$work/data" \
  --metrics-address 127.0.0.1:19808 >"$work/driver.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done

log "starting Prometheus (127.0.0.1:19090, scraping the node every second)"
cat >"$work/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: csi-interposer-node
    static_configs: [{targets: ["127.0.0.1:19808"]}]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address=127.0.0.1:19090 >"$work/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do curl -sf http://127.0.0.1:19090/-/ready >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:19090/-/ready >/dev/null || { tail -20 "$work/prometheus.log"; die "Prometheus did not start"; }

log "provisioning and publishing a volume through the CSI API"
volume_id=$("$CTL" --endpoint "unix://$work/csi.sock" up pvc-telemetry --staging "$work/staging" --target "$work/target" \
  --capacity $((64 << 20)) --pod team/app-0 \
  -p layers=trace,metrics,fault,throttle -p pageCache=dropOnOpen -p fault.ops=unlink -p 'fault.paths=*.doomed' -p fault.probability=1 \
  -p fault.errno=EACCES -p throttle.writeBytesPerSecond=1Mi -p throttle.burst=0.01 \
  -p csi.storage.k8s.io/pvc/name=data -p csi.storage.k8s.io/pvc/namespace=team)

python3 "$E2E_DIR/telemetry_check.py" "$work/target" "$volume_id" http://127.0.0.1:16686 http://127.0.0.1:19090 \
  "$REPO_DIR/charts/csi-interposer/dashboards/csi-interposer-volumes.json" "$start_jaeger" "$work/jaeger.pid"
