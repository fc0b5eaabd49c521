#!/usr/bin/env bash
# POSIX conformance: pjdfstest on a native directory and through interposer-fs mounts with all
# four layers on (fault probability 0, throttle limits high): over FUSE io_uring with the default
# page cache and with the writeback cache, and over /dev/fuse, in the same run, then compared.
#
# Pass: 0 failures through the mount, and every test that passes natively passes through the
# mount, except tests pjdfstest itself skips on any FUSE mount (listed below with the reason).
source "$(dirname "$0")/lib.sh"
require_root
trap cleanup EXIT
enable_fuse_uring

# link::link_count_max needs pathconf(_PC_LINK_MAX); glibc answers it from statfs' f_type, and
# for FUSE (any FUSE filesystem) it returns the "unknown" 127, so pjdfstest skips the test.
FUSE_STRUCTURAL_SKIPS="link::link_count_max"

work=$(mktemp -d /var/tmp/pjdfstest.XXXXXX)
trap 'cleanup; rm -rf "$work"' EXIT
chmod 755 "$work"  # the suite runs as other users too: they must reach the directories
cat >"$work/pjdfstest.toml" <<'TOML'
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
TOML
mkdir -p "$work/native"

run_suite() { # DIR LOG
  (cd "$1" && pjdfstest -c "$work/pjdfstest.toml" -p "$1") >"$2" 2>&1 || true
  grep -E '^Summary:' "$2" || { tail -20 "$2" >&2; die "pjdfstest did not finish in $1"; }
}

log "pjdfstest on the native directory"
native_summary=$(run_suite "$work/native" "$work/native.log")
echo "native: $native_summary"
passed() { grep -E '\s+ok$' "$1" | awk '{print $1}' | sort; }
for variant in "${SUITE_VARIANTS[@]}"; do
  suite_variant "$variant"
  mkdir -p "$work/source-$variant" "$work/mnt-$variant"
  mount_volume "$work/source-$variant" "$work/mnt-$variant" "$work/daemon-$variant.log" \
    -o layers=trace,metrics,fault,throttle -o fault.probability=0 \
    -o throttle.readBytesPerSecond=100Gi -o throttle.writeBytesPerSecond=100Gi \
    -o throttle.readIOPS=10000000 -o throttle.writeIOPS=10000000 \
    -o metrics.address=127.0.0.1:0 -o pageCache=$cache -o uring=$uring
  expect_transport "$work/daemon-$variant.log" "$transport"
  log "pjdfstest through interposer-fs (trace,metrics,fault,throttle; pageCache=$cache, over $transport)"
  mount_log="$work/mount-$variant.log"
  mount_summary=$(run_suite "$work/mnt-$variant" "$mount_log")
  echo "interposer ($cache, over $transport): $mount_summary"
  failures=$(echo "$mount_summary" | sed -E 's/^Summary: ([0-9]+) failed.*/\1/')
  lost=$(comm -23 <(passed "$work/native.log") <(passed "$mount_log") | grep -vxF "$FUSE_STRUCTURAL_SKIPS" || true)
  if [ "$failures" != 0 ]; then
    grep -A20 -E 'FAILED' "$mount_log" | head -80  # with pjdfstest's message and backtrace
    tail -20 "$work/daemon-$variant.log"
    die "pjdfstest: $failures failures through interposer-fs with pageCache=$cache over $transport"
  fi
  if [ -n "$lost" ]; then
    echo "passed natively but not through interposer-fs (pageCache=$cache, over $transport):"; echo "$lost"
    die "pjdfstest: interposer-fs (pageCache=$cache, over $transport) passes fewer tests than the native directory"
  fi
done
echo "pjdfstest: 0 failures through interposer-fs with pageCache keep and writeback over io_uring, and over /dev/fuse; every natively passing test passes (structural FUSE skip: $FUSE_STRUCTURAL_SKIPS)"
