#!/usr/bin/env bash
# CSI conformance: the real csi-sanity against `csi-interposer --mode all` on a unix socket,
# default idempotency count. Prints what was skipped and why (only capabilities the driver does
# not offer may be skipped), and checks that no volume mount or daemon is left behind.
source "$(dirname "$0")/lib.sh"
require_root
DRIVER_BIN="$REPO_DIR/target/release/csi-interposer"
work=$(mktemp -d /var/tmp/csi-sanity.XXXXXX)
driver_pid=""
finish() {
  [ -n "$driver_pid" ] && kill -TERM "$driver_pid" 2>/dev/null && wait "$driver_pid" 2>/dev/null
  # Volumes csi-sanity left staged would keep daemons: stop them and detach their mounts.
  pkill -f "interposer-fs $work/" 2>/dev/null || true
  for m in $(awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts); do umount -l "$m" || true; done
  rm -rf "$work"
}
trap finish EXIT

RUST_LOG=info "$DRIVER_BIN" --endpoint "unix://$work/csi.sock" --node-id sanity-node \
  --state-dir "$work/state" --data-dir "$work/data" >"$work/driver.log" 2>&1 &
driver_pid=$!
for _ in $(seq 1 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done
[ -S "$work/csi.sock" ] || { cat "$work/driver.log"; die "driver did not start"; }

log "csi-sanity against csi-interposer --mode all"
rc=0
csi-sanity --csi.endpoint="unix://$work/csi.sock" --csi.mountdir="$work/target" \
  --csi.stagingdir="$work/staging" -ginkgo.v -ginkgo.no-color >"$work/sanity.log" 2>&1 || rc=$?
summary=$(grep -E '^Ran [0-9]+ of [0-9]+ Specs' "$work/sanity.log" || true)
result=$(grep -E '(SUCCESS|FAIL)! --' "$work/sanity.log" | tail -1 || true)
echo "$summary"
echo "$result"
echo "skipped, by reason (capabilities this node-local driver does not offer):"
grep -E '^\s+\[SKIPPED\] [A-Z]' "$work/sanity.log" | sed 's/^ *\[SKIPPED\] /  /' | sort | uniq -c | sort -rn
if [ "$rc" != 0 ]; then
  grep -B2 -A25 '\[FAILED\]' "$work/sanity.log" | head -150
  tail -30 "$work/driver.log"
  die "csi-sanity failed"
fi
unexpected=$(grep -E '^\s+\[SKIPPED\] [A-Z]' "$work/sanity.log" | grep -vE 'Snapshot|ControllerPublishVolume|ControllerUnpublishVolume|Controller Publish|GroupController|ModifyVolume|Modify volume|Modify Volume|Cloning|ControllerGetVolumeHealth|ControllerListVolumeHealth|NodeGetStorageHealth' || true)
[ -z "$unexpected" ] || die "csi-sanity skipped tests for a reason other than an unoffered capability: $unexpected"
kill -TERM "$driver_pid"; wait "$driver_pid" 2>/dev/null || true; driver_pid=""
left=$(awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts)
[ -z "$left" ] || die "csi-sanity run left mounts: $left"
pgrep -f "interposer-fs $work/" >/dev/null && die "csi-sanity run left interposer-fs daemons"
echo "csi-sanity: 0 failures"
