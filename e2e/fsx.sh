#!/usr/bin/env bash
# Data integrity: fsx (checks every byte against a model) with every operation enabled, 100,000
# operations natively and through interposer-fs mounts with all four layers on: over FUSE
# io_uring with the default page cache and with the writeback cache, and over /dev/fuse.
source "$(dirname "$0")/lib.sh"
require_root
OPS=${FSX_OPS:-100000}
SEED=${FSX_SEED:-20261126}
enable_fuse_uring

work=$(mktemp -d /var/tmp/fsx.XXXXXX)
trap 'cleanup; rm -rf "$work"' EXIT
chmod 755 "$work"
cat >"$work/fsx.toml" <<'TOML'
flen = 262144
[opsize]
max = 65536
min = 0
align = 1
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 1
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
TOML
mkdir -p "$work/native" "$work/artifacts"

run_fsx() { # FILE LOG
  if fsx -f "$work/fsx.toml" -N "$OPS" -S "$SEED" -P "$work/artifacts" "$1" >"$2" 2>&1; then
    tail -1 "$2"
  else
    tail -30 "$2" >&2
    return 1
  fi
}

log "fsx: $OPS operations, seed $SEED, natively"
run_fsx "$work/native/file" "$work/native.log" || die "fsx failed on the native directory"
layers=(-o layers=trace,metrics,fault,throttle -o fault.probability=0
        -o throttle.readBytesPerSecond=100Gi -o throttle.writeBytesPerSecond=100Gi)
for variant in "${SUITE_VARIANTS[@]}"; do
  suite_variant "$variant"
  mkdir -p "$work/source-$variant" "$work/mnt-$variant"
  mount_volume "$work/source-$variant" "$work/mnt-$variant" "$work/daemon-$variant.log" \
    "${layers[@]}" -o pageCache=$cache -o uring=$uring
  expect_transport "$work/daemon-$variant.log" "$transport"
  log "fsx: $OPS operations, seed $SEED, through interposer-fs (all four layers, pageCache=$cache, over $transport)"
  run_fsx "$work/mnt-$variant/file" "$work/mount-$variant.log" \
    || die "fsx failed through interposer-fs with pageCache=$cache over $transport"
  cmp "$work/mnt-$variant/file" "$work/source-$variant/file" \
    || die "the file differs between mount and SOURCE with pageCache=$cache over $transport"
done
echo "fsx: $OPS operations with every operation enabled completed natively and through interposer-fs (pageCache keep and writeback over io_uring, and over /dev/fuse)"
