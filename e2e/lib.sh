# Shared helpers for the e2e scripts: logging, the tool PATH, and interposer-fs mounts that are
# always cleaned up (every mount made through `mount_volume` is unmounted by `cleanup`, which the
# scripts run on EXIT, also when a step fails).

set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$E2E_DIR/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$HOME/go/bin:$PATH"

log() { printf '\033[1m[%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run as root (FUSE mounts, mknod, other users' credentials)"
  [ -e /dev/fuse ] || die "/dev/fuse is missing"
}

# The interposer-fs binary (release build; `build_release` makes it).
IFS_BIN="$REPO_DIR/target/release/interposer-fs"

build_release() {
  log "cargo build --release"
  (cd "$REPO_DIR" && cargo build --release --locked --workspace --quiet)
}

# Volumes are served over FUSE io_uring when the kernel offers it, which takes the fuse module's
# enable_uring switch (off by default; Linux 6.14+). The suites turn it on so that they cover
# the transport a node with the switch on uses; variants with `-o uring=off` cover /dev/fuse.
enable_fuse_uring() {
  local p=/sys/module/fuse/parameters/enable_uring
  [ -w "$p" ] || die "$p is missing: FUSE over io_uring needs Linux 6.14+ built with CONFIG_FUSE_IO_URING"
  echo Y >"$p"
}

# expect_transport LOG WANT: the daemon's "serving" line says it serves over WANT (io_uring or
# /dev/fuse), so a silent fallback cannot pass for the other transport.
expect_transport() {
  local logf=$1 want=$2 line
  for _ in $(seq 1 100); do
    line=$(grep -m1 '^interposer-fs: serving' "$logf" || true)
    if [ -n "$line" ]; then
      case "$line" in *"over $want "*) return 0 ;; esac
      cat "$logf" >&2
      die "expected the daemon to serve over $want"
    fi
    sleep 0.05
  done
  cat "$logf" >&2
  die "no \"serving\" line in $logf"
}

# The mounts pjdfstest and fsx run through (all with every layer on): over FUSE io_uring with
# each page cache mode, and over /dev/fuse. `suite_variant NAME` sets cache, transport, uring.
SUITE_VARIANTS=(keep writeback dev-fuse)
suite_variant() {
  case $1 in
    dev-fuse) cache=keep transport=/dev/fuse uring=off ;;
    *) cache=$1 transport=io_uring uring=on ;;
  esac
}

_MOUNTS=()
_PIDS=()

# mount_volume SOURCE MOUNTPOINT LOG [-o opt]... : start interposer-fs, wait until it answers.
mount_volume() {
  local src=$1 mnt=$2 logf=$3
  shift 3
  "$IFS_BIN" "$src" "$mnt" "$@" >"$logf" 2>&1 &
  local pid=$!
  _PIDS+=("$pid")
  _MOUNTS+=("$mnt")
  for _ in $(seq 1 300); do
    if mountpoint -q "$mnt"; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "interposer-fs exited before mounting $mnt"; }
    sleep 0.05
  done
  cat "$logf" >&2
  die "mount at $mnt did not answer"
}

# unmount_all: SIGTERM every daemon we started, wait, detach anything left.
cleanup() {
  local pid mnt
  for pid in "${_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${_PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for mnt in "${_MOUNTS[@]:-}"; do
    [ -n "$mnt" ] && mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt" || true
  done
  _PIDS=()
  _MOUNTS=()
}
