#!/usr/bin/env python3
"""Benchmarks: interposer-fs side by side with the native directory, bindfs and libfuse's
passthrough_hp, in one run.

Every configuration is mounted at once over its own directory on the same filesystem; each
repetition runs every workload on every configuration in turn (interleaved), so a noisy machine
affects all of them alike. The table shows the median of the repetitions and the ratio to native;
a second table gives the issue's targets as ratios of two configurations of the same run. Each
sample starts after `sync` (what the run before left dirty is written back first), and the
hypervisor's steal time during it is recorded.
The order of the configurations is shuffled for each workload and repetition (seeded, so a run
can be repeated). On this VM the first fill of the page cache after a few idle seconds costs
the kernel several times the CPU of the same fill right after another (writing 2 GiB: 0.4 s
against 2.5-4.4 s; the VM's balloon reports free memory to the host, but touching anonymous
memory just before does not avoid it, so the cause is not settled): with a fixed order, the
configuration after a long run that freed little paid for it in every repetition.

Usage: bench.py [--short] [--reps N] [--runtime S] [--json FILE] [--work DIR] [--jaeger BIN]
                [--passthrough-hp BIN] [--configs A,B] [--workloads WORDS,WORDS] [--seed N]
  --short      a few seconds per workload (what CI runs, to keep the benchmark from rotting)
  --jaeger     a Jaeger binary to run during the benchmark, so ifs-trace/ifs-all pay for real export
               (ifs-all-sink exports the same spans to a receiver that only counts them)
  --passthrough-hp  libfuse's passthrough_hp (e2e/install-deps builds it), for its configuration
  --configs    only these configurations (native is always measured: it is what ratios divide by)
  --workloads  only the workloads whose title contains one of these (comma-separated) words;
               the daemon-wide figures (RSS, CPU per GiB, mount latency) are then left out
"""
import argparse
import glob
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IFS = os.path.join(REPO, "target", "release", "interposer-fs")
# An OTLP receiver that only counts spans (interposer-fs/examples/otlp_sink.rs), for the
# configurations whose spans go there instead of to Jaeger.
SINK = os.path.join(REPO, "target", "release", "examples", "otlp_sink")
SINK_ADDR = "127.0.0.1:4327"
DRIVER = os.path.join(REPO, "target", "release", "csi-interposer")
CTL = os.path.join(REPO, "target", "release", "csi-interposer-ctl")

# name -> interposer-fs options (None: native; "bindfs", "passthrough_hp": those servers, with
# their defaults; passthrough_hp's are the writeback cache, day-long cache timeouts and splice,
# over /dev/fuse: libfuse 3.14 has neither io_uring nor kernel passthrough). Each names its transport:
# /dev/fuse (uring=off), or FUSE over io_uring (uring=on; the benchmark turns on the kernel's
# switch), so a row never depends on how the machine was left.
LAYERS_ALL = ["layers=trace,metrics,fault,throttle", "fault.probability=0",
              "throttle.readBytesPerSecond=1000Gi", "throttle.writeBytesPerSecond=1000Gi"]
CONFIGS = [
    ("native", None),
    ("bindfs", "bindfs"),
    ("passthrough_hp", "passthrough_hp"),
    ("ifs-none", ["layers=", "uring=off"]),
    ("ifs-trace", ["layers=trace", "uring=off"]),
    ("ifs-metrics", ["layers=metrics", "uring=off"]),
    ("ifs-fault", ["layers=fault", "fault.probability=0", "uring=off"]),
    ("ifs-throttle", ["layers=throttle", "throttle.readBytesPerSecond=1000Gi",
                      "throttle.writeBytesPerSecond=1000Gi", "uring=off"]),
    ("ifs-all", LAYERS_ALL + ["uring=off"]),
    ("ifs-all-sink", LAYERS_ALL + ["uring=off"]),
    ("ifs-uring", ["layers=", "uring=on"]),
    ("ifs-all-uring", LAYERS_ALL + ["uring=on"]),
    ("ifs-kpassthrough", ["layers=", "kernelPassthrough=true", "uring=off"]),
    ("ifs-writeback", ["layers=", "pageCache=writeback", "uring=off"]),
    # passthrough_hp's day-long cache timeouts, as far as the contract allows (an hour): what
    # `cacheTTL` buys a volume nothing else writes, next to the default second.
    ("ifs-ttl1h", ["layers=", "cacheTTL=1h", "uring=off"]),
]
# Configurations whose spans go to the counting sink, not to Jaeger: the same daemon and export,
# without a real collector's CPU on the workload's two cores (in a cluster it runs elsewhere).
TO_SINK = {"ifs-all-sink"}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def wait_mounted(path, proc=None, timeout=15):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if subprocess.run(["mountpoint", "-q", path]).returncode == 0:
            try:
                os.statvfs(path)
                return time.time() - t0
            except OSError:
                pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon for {path} exited: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.002)
    raise RuntimeError(f"{path} did not mount")


def spread_directories(path):
    """On ext4, spread the directories made under `path` over the block groups (the Orlov
    allocator's top-directory flag; it then picks a group from a hash of the new directory's
    name, so the workloads name theirs at random). ext4 skips inodes freed in the last minute
    when it allocates in the same group, which makes a create several times slower: without
    this, every configuration's create+write and unpack would pay for the files the
    configuration before it just deleted (measured natively: 42,000 creates/s in a fresh
    directory, 6,000 in its sibling right after). Other filesystems refuse the flag."""
    subprocess.run(["chattr", "+T", path], capture_output=True)


class Mounts:
    def __init__(self, work):
        self.work = work
        self.procs = {}
        self.paths = {}

    def mount_all(self, configs):
        for name, opts in configs:
            src = os.path.join(self.work, name, "src")
            os.makedirs(src, exist_ok=True)
            spread_directories(src)
            if opts is None:
                self.paths[name] = src
                continue
            mnt = os.path.join(self.work, name, "mnt")
            os.makedirs(mnt, exist_ok=True)
            if opts == "bindfs":
                sh(["bindfs", src, mnt])
                wait_mounted(mnt)
            elif opts == "passthrough_hp":
                log = os.path.join(self.work, name, "log")  # a file: a pipe nobody reads could fill
                with open(log, "w") as out:
                    p = subprocess.Popen([PASSTHROUGH_HP, "--foreground", os.path.abspath(src),
                                          os.path.abspath(mnt)], stdout=out, stderr=out)
                self.procs[name] = p
                try:
                    wait_mounted(mnt, p)
                except RuntimeError as e:
                    with open(log) as f:
                        raise RuntimeError(f"{e}{f.read()}") from None
            else:
                args = [IFS, src, mnt]
                for o in opts:
                    args += ["-o", o]
                if "uring=on" in opts:
                    enable_fuse_uring()
                env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{SINK_ADDR}") if name in TO_SINK else None
                p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                self.procs[name] = p
                wait_mounted(mnt, p)
                # The daemon's "serving" line names its transport; a fallback would mislabel the row.
                want = "over io_uring" if "uring=on" in opts else "over /dev/fuse"
                said = [p.stderr.readline() for _ in range(1)]
                while "interposer-fs: serving" not in said[-1] and said[-1] and len(said) < 20:
                    said.append(p.stderr.readline())
                if want not in said[-1]:
                    raise RuntimeError(f"{name}: expected the daemon to serve {want}, it said: {said!r}")
            self.paths[name] = mnt

    def unmount_all(self):
        for name, p in self.procs.items():
            p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for name, path in self.paths.items():
            if path.endswith("/mnt"):
                subprocess.run(["umount", "-l", path], capture_output=True)


URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def enable_fuse_uring():
    """Let FUSE servers ask for io_uring (off by default in the kernel; root may turn it on)."""
    with open(URING_PARAM, "w") as f:
        f.write("Y\n")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio(directory, name, args):
    cmd = ["fio", f"--name={name}", f"--directory={directory}", "--output-format=json",
           "--ioengine=psync", "--invalidate=0", "--group_reporting"] + args
    out = sh(cmd).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    read, write = job["read"], job["write"]
    return {"MiB/s": (read["bw_bytes"] + write["bw_bytes"]) / 2**20, "IOPS": read["iops"] + write["iops"]}


def workloads(short, runtime=None):
    t = str(runtime) if runtime else ("3" if short else "12")
    big = "64M" if short else "1G"
    rfile = "128M" if short else "1G"
    # 19,000: passthrough_hp holds a descriptor per file the kernel knows, and this machine's
    # open-file limit is 20,000 (as in the reference figures).
    nfiles = 2000 if short else 19000

    def seq_write(d):
        r = fio(d, "seqwrite", ["--rw=write", "--bs=1M", f"--size={big}", "--time_based", f"--runtime={t}", "--filename=sw"])
        os.unlink(os.path.join(d, "sw"))
        return r

    def seq_write_fsync(d):
        r = fio(d, "seqwritefsync", ["--rw=write", "--bs=1M", f"--size={big}", "--end_fsync=1", "--filename=swf"])
        os.unlink(os.path.join(d, "swf"))
        return r

    def prepare_read(d):
        p = os.path.join(d, "rf")
        if not os.path.exists(p) or os.path.getsize(p) < int(rfile[:-1]) * 2**20:
            fio(d, "prep", ["--rw=write", "--bs=1M", f"--size={rfile}", "--filename=rf"])

    def seq_read_warm(d):
        prepare_read(d)
        fio(d, "warm", ["--rw=read", "--bs=1M", f"--size={rfile}", "--filename=rf"])
        return fio(d, "seqreadwarm", ["--rw=read", "--bs=1M", f"--size={rfile}", "--filename=rf", "--time_based", f"--runtime={t}"])

    def seq_read_cold(d):
        # One cold read lasts about a second and its speed depends on what the hypervisor
        # still caches: the median of three, each after dropping every cache.
        prepare_read(d)
        runs = []
        for _ in range(3):
            drop_caches()
            runs.append(fio(d, "seqreadcold", ["--rw=read", "--bs=1M", f"--size={rfile}", "--filename=rf"]))
        return sorted(runs, key=lambda r: r["MiB/s"])[1]

    def rand_read(jobs):
        def run(d):
            prepare_read(d)
            # Warm the lower file: this measures the per-request cost, not the disk (the cold
            # workload above drops every cache).
            fio(d, "warm", ["--rw=read", "--bs=1M", f"--size={rfile}", "--filename=rf"])
            return fio(d, f"randread{jobs}", ["--rw=randread", "--bs=4k", f"--size={rfile}", "--filename=rf",
                                              f"--numjobs={jobs}", "--time_based", f"--runtime={t}"])
        return run

    def rand_write(d):
        prepare_read(d)
        # From an empty page cache, so every configuration starts the same. A file whose pages
        # are cached in large folios (after a sequential write or read-ahead) makes each 4 KiB
        # write walk the folio's block buffers in ext4: natively 72,000 writes/s on such a file
        # here, 437,000 right after dropping the cache. Which folios the lower file held would
        # otherwise decide the row, not the filesystem in between.
        drop_caches()
        return fio(d, "randwrite", ["--rw=randwrite", "--bs=4k", f"--size={rfile}", "--filename=rf",
                                    "--time_based", f"--runtime={t}"])

    def source_tree(d):
        """Unpack every crate of cargo's download cache (a large real source tree), then scan it
        cold (grep through every file). Rates in files per second."""
        crates = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/cache/*/*.crate")))
        if not crates:
            raise RuntimeError("no crates in ~/.cargo/registry/cache to unpack (build the workspace first)")
        if short:
            crates = crates[:60]
        tree = tempfile.mkdtemp(prefix="tree.", dir=d)  # a fresh name: see spread_directories
        t0 = time.time()
        # .crate files are gzip'ed tarballs; gzip reads concatenated members as one stream.
        subprocess.run(f"cat {' '.join(crates)} | gzip -dc | tar -xif - -C {tree}", shell=True, check=True)
        os.sync()
        unpack = time.time() - t0
        files = int(sh(f"find {tree} -type f | wc -l", shell=True).stdout)
        drop_caches()
        t0 = time.time()
        subprocess.run(["grep", "-rc", "fn ", tree], stdout=subprocess.DEVNULL, check=True)
        scan = time.time() - t0
        shutil.rmtree(tree)
        return {"unpacked files/s": files / unpack, "scanned files/s": files / scan}

    def pgbench(d):
        """PostgreSQL with its data directory on the mount: pgbench's default TPC-B-like
        transactions, 2 clients, as user postgres."""
        pg = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not pg:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        bin_ = pg[-1]
        data = os.path.join(d, "pgdata")
        sock = tempfile.mkdtemp(prefix="pgsock.")
        os.makedirs(data)
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        conn = ["-h", sock, "-p", "5499", "-U", "postgres"]
        try:
            sh(as_pg + [f"{bin_}/initdb", "-D", data, "-A", "trust", "-U", "postgres"])
            sh(as_pg + [f"{bin_}/pg_ctl", "-D", data, "-w", "-l", os.path.join(sock, "pg.log"),
                        "-o", f"-k {sock} -p 5499 -c listen_addresses=''", "start"])
            sh(as_pg + ["pgbench", *conn, "-i", "-q", "-s", "2" if short else "10", "postgres"])
            out = sh(as_pg + ["pgbench", *conn, "-c", "2", "-j", "2", "-T", t, "postgres"]).stdout
            tps = float(next(l for l in out.splitlines() if l.startswith("tps =")).split()[2])
        finally:
            subprocess.run(as_pg + [f"{bin_}/pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(sock, ignore_errors=True)
        return {"TPS": tps}

    def metabench(d, uid=0):
        md = tempfile.mkdtemp(prefix="meta.", dir=d)  # a fresh name: see spread_directories
        os.chown(md, uid, uid)
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
        r = json.loads(sh(as_user + [METABENCH, md, str(nfiles)]).stdout)
        os.rmdir(md)
        return r

    def metadata(d):
        r = metabench(d)
        return {"create/s": r["create"], "stat/s": r["stat"], "unlink/s": r["unlink"],
                "getxattr/s": r["getxattr"]}

    def metadata_unprivileged(d):
        """The same as a pod's usual non-root user: the daemon then creates and removes with
        the caller's credentials (uid, gid, supplementary groups), which root callers skip."""
        r = metabench(d, uid=65534)
        return {"create/s": r["create"], "unlink/s": r["unlink"]}

    return [
        ("seq write 1M, page cache", seq_write, "MiB/s"),
        (f"seq write {big} + fsync", seq_write_fsync, "MiB/s"),
        ("seq read 1M, lower cached", seq_read_warm, "MiB/s"),
        ("seq read 1M, cold", seq_read_cold, "MiB/s"),
        ("rand read 4k, 1 job", rand_read(1), "IOPS"),
        ("rand read 4k, 2 jobs", rand_read(2), "IOPS"),
        ("rand write 4k", rand_write, "IOPS"),
        (f"create+write 4k ({nfiles} files)", metadata, "create/s"),
        (f"stat ({nfiles} files)", None, "stat/s"),
        (f"unlink ({nfiles} files)", None, "unlink/s"),
        ("getxattr, absent name: one round trip", None, "getxattr/s"),
        (f"create+write 4k ({nfiles} files), uid 65534", metadata_unprivileged, "create/s"),
        (f"unlink ({nfiles} files), uid 65534", None, "unlink/s"),
        ("source tree: unpack (cargo's crate cache)", source_tree, "unpacked files/s"),
        ("source tree: scan cold (grep -r)", None, "scanned files/s"),
        ("pgbench, data directory on the mount", pgbench, "TPS"),
    ]


# Workloads too long to run on every configuration: the ones users compare.
APP_CONFIGS = {"pgbench, data directory on the mount": ["native", "bindfs", "ifs-none", "ifs-all", "ifs-all-sink", "ifs-uring",
                                                     "ifs-all-uring", "ifs-kpassthrough", "ifs-writeback"]}
# Workloads a configuration cannot run. passthrough_hp keeps a descriptor open per inode the
# kernel knows, and the source tree has more files than the open-file limit allows; it serves
# every caller as root (no switch to the caller's credentials), so a non-root caller (uid 65534;
# PostgreSQL, hence not in APP_CONFIGS) is refused its own new files.
NOT_ON = {"passthrough_hp": ["source tree: unpack (cargo's crate cache)", "uid 65534"]}


def runs_on(title, name):
    return (name in APP_CONFIGS.get(title, [name])
            and not any(w in title for w in NOT_ON.get(name, [])))


def machine_facts():
    """What decides the cost of a FUSE round trip on this machine: each request wakes a daemon
    thread and each reply wakes the caller, often on the other CPU. A virtual CPU that halts
    when idle (cpuidle haltpoll with guest_halt_poll_ns=0) pays a hypervisor exit for each
    wake-up; one that polls first does not. Recorded so runs on different machines compare."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    facts = {"kernel": os.uname().release, "cpus": os.cpu_count(),
             "cpuidle driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
             "cpuidle governor": read("/sys/devices/system/cpu/cpuidle/current_governor"),
             "haltpoll guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
             "fuse enable_uring": read("/sys/module/fuse/parameters/enable_uring")}
    return {k: v for k, v in facts.items() if v is not None}


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds():
    """CPU time the hypervisor gave other guests while this VM had work, summed over CPUs."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def settle(collector, limit=15.0):
    """Wait until the collector has ingested the spans of the runs before (it shares the two
    cores): each configuration pays for its own telemetry, not for the one measured before it."""
    if collector is None:
        return
    deadline = time.time() + limit
    before = cpu_seconds(collector.pid)
    while time.time() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(collector.pid)
        if now - before < 0.02:  # under 8% of a core
            return
        before = now


class Sink:
    """The counting OTLP receiver, started for the run; `spans` is its running total."""

    def __init__(self):
        if not os.access(SINK, os.X_OK):
            raise RuntimeError(f"{SINK} is not built (cargo build --release -p interposer-fs --example otlp_sink)")
        self.spans = 0
        self.proc = subprocess.Popen([SINK, SINK_ADDR], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        host, port = SINK_ADDR.rsplit(":", 1)
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the counting sink did not listen on {SINK_ADDR}")
                time.sleep(0.05)

    def _read(self):
        for line in self.proc.stdout:
            fields = dict(f.split("=", 1) for f in line.split())
            self.spans = int(fields.get("spans", self.spans))


def mount_latency(work, samples, uring):
    src, mnt = os.path.join(work, "lat", "src"), os.path.join(work, "lat", "mnt")
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    out = []
    for _ in range(samples):
        t0 = time.time()
        p = subprocess.Popen([IFS, src, mnt, "-o", "layers=trace,metrics,fault,throttle", "-o", f"uring={uring}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(mnt, p)
        out.append((time.time() - t0) * 1000)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
    return statistics.median(out)


def csi_mount_latency(work, samples):
    """NodeStageVolume + NodePublishVolume through the real driver, as kubelet calls them, until
    the pod's path answers: what a pod's start waits for. Timed around `csi-interposer-ctl
    mount`, so the client's own start and connection are included."""
    base = os.path.join(work, "csi")
    os.makedirs(base)
    sock = f"unix://{base}/csi.sock"
    staging, target = os.path.join(base, "staging"), os.path.join(base, "pod", "mount")
    ctl = [CTL, "--endpoint", sock]
    paths = ["--staging", staging, "--target", target]
    with open(os.path.join(base, "driver.log"), "w") as log:
        driver = subprocess.Popen([DRIVER, "--endpoint", sock, "--node-id", "bench",
                                   "--state-dir", f"{base}/state", "--data-dir", f"{base}/data"],
                                  stdout=log, stderr=log)
    volume = None
    try:
        t0 = time.time()
        while not os.path.exists(f"{base}/csi.sock"):
            if driver.poll() is not None or time.time() - t0 > 15:
                raise RuntimeError(f"csi-interposer did not start (see {base}/driver.log)")
            time.sleep(0.02)
        out = sh(ctl + ["create", "pvc-bench-latency", "-p", "layers=trace,metrics,fault,throttle",
                        "-p", "fault.probability=0"]).stdout.split()
        volume, context = out[0], out[1:]
        times = []
        for _ in range(samples):
            t0 = time.time()
            sh(ctl + ["mount", volume] + paths + [a for kv in context for a in ("-c", kv)])
            wait_mounted(target)
            times.append((time.time() - t0) * 1000)
            sh(ctl + ["unmount", volume] + paths)
        return statistics.median(times)
    finally:
        if volume is not None:
            subprocess.run(ctl + ["down", volume] + paths, capture_output=True)
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(timeout=15)
        except subprocess.TimeoutExpired:
            driver.kill()
        for path in (target, staging):
            subprocess.run(["umount", "-l", path], capture_output=True)


def main():
    # SIGTERM/SIGINT must still unmount everything (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default="/var/tmp")
    ap.add_argument("--runtime", type=int, help="seconds per time-based workload")
    ap.add_argument("--jaeger", help="Jaeger binary to start for the run (OTLP on 127.0.0.1:4317)")
    ap.add_argument("--passthrough-hp", help="libfuse's passthrough_hp binary (needed by that configuration)")
    ap.add_argument("--configs", help="comma-separated configurations to run (native always runs)")
    ap.add_argument("--workloads", help="comma-separated words; run the workloads whose title has one")
    ap.add_argument("--seed", type=int, default=1, help="seed of the configurations' order in each workload")
    a = ap.parse_args()
    known = [n for n, _ in CONFIGS]
    wanted = set(a.configs.split(",")) if a.configs else set(known)
    if wanted - set(known):
        ap.error(f"unknown configurations {sorted(wanted - set(known))}; known: {', '.join(known)}")
    configs = [(n, o) for n, o in CONFIGS if n in wanted or n == "native"]
    if "passthrough_hp" in wanted and not a.passthrough_hp:
        ap.error("the passthrough_hp configuration needs --passthrough-hp BIN (e2e/install-deps --print-passthrough-hp)")
    global PASSTHROUGH_HP
    PASSTHROUGH_HP = a.passthrough_hp
    wl = selected_workloads(workloads(a.short, a.runtime), a.workloads)
    if not wl:
        ap.error(f"no workload title contains any of {a.workloads!r}")
    reps = a.reps or (1 if a.short else 3)
    work = tempfile.mkdtemp(prefix="bench.", dir=a.work)
    os.chmod(work, 0o755)
    global METABENCH
    METABENCH = os.path.join(work, "metabench")
    sh(["gcc", "-O2", "-o", METABENCH, os.path.join(os.path.dirname(os.path.abspath(__file__)), "metabench.c")])
    mounts = Mounts(work)
    results = {}  # workload -> config -> [values]
    extra = {}
    collector = {}  # config -> (collector CPU seconds, workload seconds)
    shuffle = random.Random(a.seed)
    jaeger = sink = None
    if a.jaeger:
        jaeger = subprocess.Popen([a.jaeger], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4317"
        time.sleep(3)
    sunk = {}  # config -> spans the sink received during its workloads
    stolen = []  # (repetition, workload, config, share of the CPUs' time the hypervisor took)
    try:
        if any(n in TO_SINK for n, _ in configs):
            sink = Sink()
        mounts.mount_all(configs)
        idle_rss = {n: rss_kib(p.pid, "VmRSS") for n, p in mounts.procs.items()}
        for rep in range(reps):
            for title, fn, metric in wl:
                if fn is None:
                    continue
                order = [n for n, _ in configs if runs_on(title, n)]
                shuffle.shuffle(order)
                for name in order:
                    # The run before left dirty pages (a random write dirties the whole file):
                    # written back now, not in the middle of this run.
                    t_sync = time.time()
                    os.sync()
                    synced = time.time() - t_sync
                    print(f"[rep {rep + 1}/{reps}] {title}: {name} (sync {synced:.1f} s)", file=sys.stderr, flush=True)
                    own = sink.proc if name in TO_SINK else jaeger
                    settle(jaeger)
                    settle(sink and sink.proc)
                    c0, s0, t0 = cpu_seconds(own.pid) if own else 0.0, sink.spans if sink else 0, time.time()
                    st0 = steal_seconds()
                    r = fn(mounts.paths[name])
                    busy = time.time() - t0
                    stolen.append((rep + 1, title, name, (steal_seconds() - st0) / busy / os.cpu_count()))
                    if own:
                        time.sleep(0.6)  # past the daemons' export delay (500 ms)
                        settle(own)  # until it has ingested this run's spans
                        cpu, total = collector.get(name, (0.0, 0.0))
                        collector[name] = (cpu + cpu_seconds(own.pid) - c0, total + busy)
                    if name in TO_SINK:
                        sunk[name] = sunk.get(name, 0) + sink.spans - s0
                    # One run measures its row and the rows without a function after it
                    # (create, stat, unlink; unpack, scan).
                    i = next(i for i, w in enumerate(wl) if w[0] == title)
                    rows = [wl[i]] + list(itertools.takewhile(lambda w: w[1] is None, wl[i + 1:]))
                    for t2, _, m2 in rows:
                        results.setdefault(t2, {}).setdefault(name, []).append(r[m2])
        # The collector shares the workloads' CPUs here (in a cluster it runs elsewhere): how
        # much of them it took is part of what the trace layer cost in this run.
        for name, (cpu, total) in sorted(collector.items(), key=lambda c: [n for n, _ in configs].index(c[0])):
            what = "counting sink" if name in TO_SINK else "collector"
            extra[f"{what} CPU, cores busy per second of {name}'s workloads"] = cpu / total
        for name, n in sunk.items():
            if n == 0:
                raise RuntimeError(f"{name}: the counting sink received no spans (is export broken?)")
            extra[f"spans the counting sink received from {name} (thousands)"] = n / 1000
        extra["hypervisor steal, most taken during one run (% of the CPUs' time)"] = \
            100 * max((s for *_, s in stolen), default=0.0)
        if a.workloads is None:
            extra.update(daemon_figures(work, mounts, idle_rss, a.short))
    finally:
        mounts.unmount_all()
        for p in (jaeger, sink and sink.proc):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return report(a, configs, wl, results, extra, reps, stolen)


def selected_workloads(wl, words):
    """The workloads whose title contains one of `words`, each with the rows it also measures
    (a workload without a function is measured by the one before it)."""
    if words is None:
        return wl
    words = [w.strip() for w in words.split(",") if w.strip()]
    out = []
    for i, w in enumerate(wl):
        if w[1] is None:
            continue
        rows = [w] + list(itertools.takewhile(lambda x: x[1] is None, wl[i + 1:]))
        if any(word in r[0] for r in rows for word in words):
            out += rows
    return out


def daemon_figures(work, mounts, idle_rss, short):
    """RSS idle and at peak, CPU per GiB moved, mount latency."""
    # CPU per GiB moved: a dedicated sequential write+read of 1 GiB (256 MiB short) per config.
    size = 256 if short else 1024
    cpu = {}
    for name, p in mounts.procs.items():
        # Unmeasured first, so no configuration's figure includes a first fill after idle
        # seconds (see the module doc).
        fio(mounts.paths[name], "cpu", ["--rw=write", "--bs=1M", f"--size={size}M", "--filename=cpu"])
        os.unlink(os.path.join(mounts.paths[name], "cpu"))
        c0 = cpu_seconds(p.pid)
        fio(mounts.paths[name], "cpu", ["--rw=write", "--bs=1M", f"--size={size}M", "--filename=cpu", "--end_fsync=1"])
        fio(mounts.paths[name], "cpu", ["--rw=read", "--bs=1M", f"--size={size}M", "--filename=cpu"])
        os.unlink(os.path.join(mounts.paths[name], "cpu"))
        cpu[name] = (cpu_seconds(p.pid) - c0) / (2 * size / 1024)
    extra = {}
    for name, label in (("passthrough_hp", "passthrough_hp"), ("ifs-none", "no layers"), ("ifs-all", "all layers"),
                        ("ifs-uring", "no layers, io_uring"), ("ifs-all-uring", "all layers, io_uring")):
        if name in mounts.procs:
            extra[f"daemon RSS idle, {label} (MiB)"] = idle_rss[name] / 1024
            extra[f"daemon peak RSS under load, {label} (MiB)"] = rss_kib(mounts.procs[name].pid, "VmHWM") / 1024
    extra["mount latency, all layers (ms, median of 5)"] = mount_latency(work, 5, "off")
    enable_fuse_uring()
    extra["mount latency, all layers, io_uring (ms, median of 5)"] = mount_latency(work, 5, "on")
    extra["NodeStageVolume + NodePublishVolume to first answer, all layers, io_uring, through csi-interposer "
          "(ms, median of 5, client start included)"] = csi_mount_latency(work, 5)
    for name, v in cpu.items():
        extra[f"daemon CPU seconds per GiB moved, {name}"] = v
    return extra


# The targets, each a ratio of two configurations measured in the same run:
# (numerator, denominator, at least, rows it applies to: a word of their title, or None for all).
# ifs-all-sink and ifs-all-uring are held to the all-layers target too: the same layers without
# a collector on the workload's cores, and over the other transport.
TARGETS = [
    ("ifs-none", "passthrough_hp", 1.0, None),
    ("ifs-none", "bindfs", 3.0, None),
    ("ifs-all", "ifs-none", 0.8, None),
    ("ifs-all-sink", "ifs-none", 0.8, None),
    ("ifs-all-uring", "ifs-uring", 0.8, None),
    ("ifs-kpassthrough", "native", 0.9, "read"),
]


def target_ratios(table):
    """Per target present in the run, per row it applies to: the ratio of the medians, and
    whether it is at least the target."""
    out = {}
    for num, den, least, word in TARGETS:
        name = f"{num} / {den} >= {least:g}" + (f" ({word} rows)" if word else "")
        rows = {}
        for title, row in table.items():
            if (word is None or word in title) and num in row and den in row and row[den]["median"]:
                ratio = row[num]["median"] / row[den]["median"]
                rows[title] = {"ratio": ratio, "met": ratio >= least}
        if rows:
            out[name] = rows
    return out


# Native samples of one row further apart than this (largest / smallest) flag the row: the
# machine (the hypervisor's caching of the virtual disk, above all) moved under it.
NOISY_SPREAD = 1.4


# Runs during which the hypervisor took more than this share of the CPUs' time are listed.
STEAL_NOTED = 0.02


def sample_spread(samples):
    return max(samples) / min(samples) if len(samples) > 1 and min(samples) > 0 else 1.0


def report(a, configs, wl, results, extra, reps, stolen):
    """Print the table and the figures, write the JSON; fail if a cell is missing."""
    names = [n for n, _ in configs]
    table = {}
    for title, per in results.items():
        med = {n: statistics.median(v) for n, v in per.items()}
        table[title] = {n: {"median": med[n], "ratio": med[n] / med["native"] if med.get("native") else None,
                            "samples": per[n]} for n in med}
    print(f"\nbench: {'short' if a.short else 'full'} mode, {reps} repetition(s), median; ratio to native in ();"
          f" configurations in shuffled order (seed {a.seed})"
          + ("; spans exported to a local Jaeger" if a.jaeger else "; no collector listening (spans built, export fails)")
          + ("; ifs-all-sink's to a local receiver that only counts them" if any(n in TO_SINK for n in names) else ""))
    print("| workload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    noisy = {}
    for title, row in table.items():
        cells = []
        for n in names:
            c = row.get(n)
            cells.append("-" if c is None else f"{c['median']:.0f} ({c['ratio']:.2f})")
        unit = next((m for t, _, m in wl if t == title), "")
        spread = sample_spread(row.get("native", {}).get("samples", []))
        if spread > NOISY_SPREAD:
            noisy[title] = spread
        mark = " (noisy)" if title in noisy else ""
        print(f"| {title} [{unit}]{mark} | " + " | ".join(cells) + " |")
    print()
    for title, spread in noisy.items():
        print(f"noisy: {title}: native's own samples differ {spread:.1f}x between repetitions, so this"
              f" row's ratios say more about the machine than about the filesystems")
    targets = target_ratios(table)
    if targets:
        print("\ntargets: each a ratio of two configurations in this run; \"below\" marks a miss")
        print("| workload | " + " | ".join(targets) + " |")
        print("|---|" + "---|" * len(targets))
        for title in table:
            cells = []
            for rows in targets.values():
                t = rows.get(title)
                cells.append("-" if t is None else f"{t['ratio']:.2f}" + ("" if t["met"] else " below"))
            print(f"| {title} | " + " | ".join(cells) + " |")
        print()
    for k, v in extra.items():
        print(f"{k}: {v:.2f}")
    # A sample taken while the hypervisor ran other guests measures them as much as us.
    for r, title, name, share in stolen:
        if share > STEAL_NOTED:
            print(f"steal: repetition {r}, {title}, {name}: the hypervisor took {100 * share:.0f}% of the CPUs' time")
    machine = machine_facts()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    doc = {"mode": "short" if a.short else "full", "repetitions": reps, "seed": a.seed, "jaeger": bool(a.jaeger), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "configs": dict(configs), "results": table, "targets": targets, "noisy": noisy, "extra": extra,
           "steal": [{"repetition": r, "workload": t, "config": n, "share": s} for r, t, n, s in stolen],
           "machine": machine}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nJSON written to {a.json}")
    missing = [(t, n) for t, fn, _ in wl if fn is not None for n in names
               if runs_on(t, n) and n not in table.get(t, {})]
    if missing:
        print(f"incomplete: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
