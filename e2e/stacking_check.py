#!/usr/bin/env python3
"""Stacked volumes against a real API server; run by e2e/stacking.sh, which starts the control
plane, the lower driver (lower.csi.dev) and csi-interposer (interposer.csi.dev, pvc backend),
each with its own external-provisioner. Plays kubelet with csi-interposer-ctl mount/unmount.

Scenarios, in order:
1. a claim of the `stacked` class is provisioned through both provisioners: our CreateVolume
   makes a labelled backing claim of the `lower` class and waits for it to bind (and, for a
   WaitForFirstConsumer backing class, provisions it for the node as the scheduler would);
2. data written through our published mount is found in the lower volume's directory;
3. live tuning: a reader sees faults within 5 s of annotating the claim and none within 5 s of
   removing the annotation; an invalid value changes nothing and posts a Warning Event;
4. a static volume wraps an existing claim (backingClaim) and leaves it alone when done;
5. a lower driver without a socket is a clear FailedPrecondition;
6. a backing claim that never binds: CreateVolume is Unavailable (retryable), idempotent, and
   DeleteVolume removes the claim;
7. the node plugin dies between the lower NodePublish and our mount: the next call finishes;
8. teardown leaves no backing claim, PV, VolumeAttachment, mount or process behind.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

WORK = os.environ["WORK"]
CTL = os.environ["CTL"]
DRIVER = os.environ["DRIVER"]
PLUGINS = os.environ["PLUGINS"]
OURS = f"unix://{PLUGINS}/interposer.csi.dev/csi.sock"
PREFIX = "interposer.csi.dev/"

checks = 0
failures = []


def check(cond, what):
    global checks
    checks += 1
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


def run(*args, input=None):
    env = dict(os.environ, RUST_BACKTRACE="0")
    return subprocess.run(list(args), input=input, capture_output=True, text=True, env=env)


def kubectl(*args, input=None):
    r = run("kubectl", *args, input=input)
    if r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def get(kind, name=None, ns=None, selector=None):
    args = ["get", kind, "-o", "json"]
    if name:
        args.insert(2, name)
    if ns:
        args += ["-n", ns]
    if selector:
        args += ["-l", selector]
    r = run("kubectl", *args)
    if r.returncode != 0:
        if "NotFound" in r.stderr:
            return None
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def wait(what, timeout, fn):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def ctl(*args, endpoint=OURS):
    return run(CTL, "--endpoint", endpoint, *args)


def ctl_ok(*args, endpoint=OURS):
    r = ctl(*args, endpoint=endpoint)
    if r.returncode != 0:
        raise RuntimeError(f"csi-interposer-ctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def paths(name):
    return ["--staging", f"{WORK}/kubelet/staging/{name}", "--target", f"{WORK}/kubelet/pods/{name}/mount"]


def target(name):
    return f"{WORK}/kubelet/pods/{name}/mount"


def bound_claim(ns, name, timeout=90):
    return wait(f"claim {ns}/{name} to bind", timeout,
                lambda: (c := get("pvc", name, ns)) and c["status"].get("phase") == "Bound" and c)


def claim_yaml(ns, name, cls, size="64Mi", extra=""):
    return f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: "{cls}"
  resources: {{requests: {{storage: {size}}}}}
{extra}"""


def events(ns, name):
    e = get("events.events.k8s.io", ns=ns) or {"items": []}
    return [x for x in e["items"] if x.get("regarding", {}).get("name") == name]


def volume_id_of(name):
    return "iv-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def mounts_under(prefix):
    with open("/proc/mounts") as f:
        return [l.split()[1] for l in f if l.split()[1].startswith(prefix)]


class Reader(threading.Thread):
    """Reads a file through the mount in a loop, recording (time, ok)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.log, self.stop = path, [], False

    def run(self):
        while not self.stop:
            try:
                with open(self.path, "rb") as f:
                    f.read()
                ok = True
            except OSError:
                ok = False
            self.log.append((time.monotonic(), ok))
            time.sleep(0.02)

    def first(self, ok, after):
        return next((t for t, o in list(self.log) if t >= after and o == ok), None)

    def any_failure(self, start, end):
        return any(not o for t, o in list(self.log) if start <= t <= end)


def scenario_provision_and_data():
    kubectl("apply", "-f", "-", input=claim_yaml("team", "data", "stacked"))
    claim = bound_claim("team", "data")
    pv = get("pv", claim["spec"]["volumeName"])
    csi = pv["spec"]["csi"]
    attrs = csi.get("volumeAttributes", {})
    check(csi["driver"] == "interposer.csi.dev", "1. the claim is bound to a PV of interposer.csi.dev")
    backing = get("pvc", ns="csi-interposer", selector=f"{PREFIX}volume={csi['volumeHandle']}")["items"]
    check(len(backing) == 1, f"1. exactly one backing claim labelled with the volume id (found {len(backing)})")
    b = backing[0]
    check(b["spec"].get("storageClassName") == "lower" and b["status"].get("phase") == "Bound",
          "1. the backing claim is of class lower and Bound")
    check(b["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "csi-interposer",
          "1. the backing claim is labelled managed-by csi-interposer")
    check(attrs.get(PREFIX + "backingPV") == b["spec"]["volumeName"],
          "1. the volume context records the backing PV")
    lower_pv = get("pv", b["spec"]["volumeName"])
    check(lower_pv["spec"]["csi"]["driver"] == "lower.csi.dev", "1. the backing PV is lower.csi.dev's")

    ctx = [a for k, v in attrs.items() for a in ("-c", f"{k}={v}")]
    ctl_ok("mount", csi["volumeHandle"], *paths("data"), *ctx, "--pod", "team/app")
    check(os.path.ismount(target("data")), "2. NodeStage + NodePublish give a mount at the target")
    with open(f"{target('data')}/hello.txt", "w") as f:
        f.write("through the stack\n")
    lower_file = f"{WORK}/lower/data/{lower_pv['spec']['csi']['volumeHandle']}/hello.txt"
    check(os.path.exists(lower_file) and open(lower_file).read() == "through the stack\n",
          "2. data written through our target is in the lower volume's directory")
    # A pod goes (unpublish, twice: kubelet retries), the volume stays staged on its lower
    # volume, and the next pod's publish finds the data.
    ctl_ok("unmount", "--keep-staged", csi["volumeHandle"], *paths("data"))
    ctl_ok("unmount", "--keep-staged", csi["volumeHandle"], *paths("data"))
    lower_target = f"{WORK}/ours/lower/{csi['volumeHandle']}/mount"
    check(os.path.ismount(lower_target) and not os.path.ismount(target("data")),
          "2. a repeated NodeUnpublish leaves the staged volume's lower mount alone")
    ctl_ok("mount", csi["volumeHandle"], *paths("data"), *ctx, "--pod", "team/app")
    check(open(f"{target('data')}/hello.txt").read() == "through the stack\n",
          "2. publishing again finds the data")
    return csi["volumeHandle"]


def scenario_live_tuning():
    reader = Reader(f"{target('data')}/hello.txt")
    reader.start()
    time.sleep(0.5)
    check(not reader.any_failure(0, time.monotonic()), "3. reads succeed before tuning")
    t0 = time.monotonic()
    kubectl("annotate", "pvc", "data", "-n", "team", f"{PREFIX}fault.probability=1", f"{PREFIX}fault.errno=EIO")
    try:
        t = wait("reads to fail", 10, lambda: reader.first(False, t0))
        check(t - t0 < 5, f"3. faults begin {t - t0:.2f} s after annotating the claim (< 5 s)")
    except RuntimeError as e:
        check(False, f"3. faults begin after annotating: {e}")
    ev = wait("a Retuned event", 10, lambda: [e for e in events("team", "data") if e["reason"] == "Retuned"])
    check("fault.probability: 0" in ev[0].get("note", "") or "fault.probability: (default) -> 1" in ev[0].get("note", ""),
          f"3. a Normal Retuned event says what changed: {ev[0].get('note')!r}")
    t1 = time.monotonic()
    kubectl("annotate", "pvc", "data", "-n", "team", f"{PREFIX}fault.probability-", f"{PREFIX}fault.errno-")
    try:
        t = wait("reads to succeed", 10, lambda: reader.first(True, t1))
        check(t - t1 < 5, f"3. faults end {t - t1:.2f} s after removing the annotation (< 5 s)")
        time.sleep(1)
        check(not reader.any_failure(t + 0.5, time.monotonic()), "3. and reads keep succeeding")
    except RuntimeError as e:
        check(False, f"3. faults end after removing the annotation: {e}")
    t2 = time.monotonic()
    kubectl("annotate", "pvc", "data", "-n", "team", f"{PREFIX}fault.probability=2")
    try:
        ev = wait("a TuningRefused event", 10,
                  lambda: [e for e in events("team", "data") if e["reason"] == "TuningRefused"])
        check(ev[0]["type"] == "Warning" and "fault.probability" in ev[0].get("note", ""),
              f"3. an invalid value gives a Warning event naming the key: {ev[0].get('note')!r}")
    except RuntimeError as e:
        check(False, f"3. an invalid value gives a Warning event: {e}")
    time.sleep(1.5)
    check(not reader.any_failure(t2, time.monotonic()), "3. an invalid value leaves the volume as it was")
    kubectl("annotate", "pvc", "data", "-n", "team", f"{PREFIX}fault.probability-")
    reader.stop = True
    reader.join()


def scenario_static_wrap():
    kubectl("apply", "-f", "-", input=claim_yaml("team", "existing", "lower"))
    claim = bound_claim("team", "existing")
    lower_pv = get("pv", claim["spec"]["volumeName"])
    ctl_ok("mount", "static-existing", *paths("existing"), "-c", "backend=pvc",
           "-c", "backingClaim=team/existing", "-c", "layers=metrics")
    with open(f"{target('existing')}/static.txt", "w") as f:
        f.write("wrapped\n")
    lower_file = f"{WORK}/lower/data/{lower_pv['spec']['csi']['volumeHandle']}/static.txt"
    check(os.path.exists(lower_file), "4. a static volume with backingClaim writes into that claim's volume")
    ctl_ok("unmount", "static-existing", *paths("existing"))
    c = get("pvc", "existing", "team")
    check(c is not None and c["status"]["phase"] == "Bound", "4. the wrapped claim is left as it was")
    check(not os.path.exists(f"{WORK}/ours/state/lower/static-existing.json"),
          "4. unmount undid the lower volume (no record left)")
    check(not mounts_under(f"{WORK}/ours/lower/static-existing"), "4. no lower mount left")


def scenario_missing_socket():
    kubectl("apply", "-f", "-", input="""apiVersion: v1
kind: PersistentVolume
metadata: {name: gone-pv}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: team, name: gone}
  csi: {driver: gone.csi.dev, volumeHandle: gone-1}
""")
    kubectl("apply", "-f", "-", input=claim_yaml("team", "gone", "", extra="  volumeName: gone-pv\n"))
    bound_claim("team", "gone", timeout=60)
    r = ctl("mount", "static-gone", *paths("gone"), "-c", "backend=pvc", "-c", "backingClaim=team/gone")
    check(r.returncode != 0 and "FailedPrecondition" in r.stderr and "no socket" in r.stderr,
          f"5. a lower driver without a socket is FailedPrecondition: {r.stderr.strip()[-160:]!r}")
    ctl_ok("unmount", "static-gone", *paths("gone"))
    kubectl("delete", "pvc", "gone", "-n", "team", "--wait=true")
    kubectl("delete", "pv", "gone-pv", "--wait=true")


def scenario_never_binds():
    kubectl("apply", "-f", "-", input="""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: never}
provisioner: nobody.csi.dev
volumeBindingMode: Immediate
""")
    args = ["create", "never-1", "--capacity", str(64 << 20), "-p", "backend=pvc", "-p", "backingStorageClass=never"]
    r1 = ctl(*args)
    check(r1.returncode != 0 and "Unavailable" in r1.stderr and "not bound" in r1.stderr,
          f"6. a backing claim that does not bind makes CreateVolume Unavailable: {r1.stderr.strip()[-160:]!r}")
    r2 = ctl(*args)
    vid = volume_id_of("never-1")
    claims = get("pvc", ns="csi-interposer", selector=f"{PREFIX}volume={vid}")["items"]
    check(r2.returncode != 0 and len(claims) == 1 and claims[0]["status"]["phase"] == "Pending",
          "6. a retry finds the same pending claim (one claim, Pending)")
    # As if another replica answered: DeleteVolume finds the claim by name and labels alone.
    os.unlink(f"{WORK}/ours/state/controller/{vid}.json")
    ctl_ok("delete", vid)
    try:
        wait("the pending claim to go", 30,
             lambda: not get("pvc", ns="csi-interposer", selector=f"{PREFIX}volume={vid}")["items"])
        check(True, "6. DeleteVolume removes the claim that never bound, without a local record")
    except RuntimeError as e:
        check(False, f"6. DeleteVolume removes the claim that never bound: {e}")


def scenario_wait_for_first_consumer():
    kubectl("apply", "-f", "-", input="""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: lower-wfc}
provisioner: lower.csi.dev
parameters: {layers: ""}
volumeBindingMode: WaitForFirstConsumer
""")
    r = ctl("create", "wfc-1", "--capacity", str(64 << 20), "-p", "backend=pvc", "-p", "backingStorageClass=lower-wfc")
    vid = volume_id_of("wfc-1")
    claims = get("pvc", ns="csi-interposer", selector=f"{PREFIX}volume={vid}")["items"]
    ok = r.returncode == 0 and len(claims) == 1
    check(ok and claims[0]["status"]["phase"] == "Bound"
          and claims[0]["metadata"].get("annotations", {}).get("volume.kubernetes.io/selected-node") == "node-a",
          f"1. a WaitForFirstConsumer backing class binds: the claim is provisioned for this node ({r.stderr.strip()[-120:]!r})")
    ctl_ok("delete", vid)
    wait("the WaitForFirstConsumer claim to go", 30,
         lambda: not get("pvc", ns="csi-interposer", selector=f"{PREFIX}volume={vid}")["items"])


def scenario_restart_mid_stage():
    sock = f"{WORK}/crashy.sock"
    endpoint = f"unix://{sock}"
    cmd = [DRIVER, "--driver-name", "interposer.csi.dev", "--node-id", "node-a", "--mode", "node",
           "--endpoint", endpoint, "--state-dir", f"{WORK}/crashy/state", "--data-dir", f"{WORK}/crashy/data",
           "--plugins-dir", PLUGINS, "--lower-dir", f"{WORK}/crashy/lower"]
    log = open(f"{WORK}/crashy.log", "a")

    def start(env_extra):
        env = dict(os.environ, **env_extra)
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        wait("the crashy driver's socket", 10, lambda: os.path.exists(sock))
        return p

    p = start({"CSI_INTERPOSER_CRASH_AT": "after-lower-publish"})
    args = ["mount", "crash-1", *paths("crash"), "-c", "backend=pvc", "-c", "backingClaim=team/existing"]
    r = ctl(*args, endpoint=endpoint)
    code = p.wait(timeout=10)
    check(r.returncode != 0 and code == 86, f"7. the node plugin died at the crash point (exit {code})")
    lower_target = f"{WORK}/crashy/lower/crash-1/mount"
    check(os.path.ismount(lower_target), "7. the lower volume was published before the crash")
    os.unlink(sock)
    p = start({})
    try:
        ctl_ok(*args, endpoint=endpoint)
        ok = os.path.exists(f"{target('crash')}/static.txt")
        check(ok, "7. after the restart the same NodeStage/NodePublish complete, data visible")
        ctl_ok("unmount", "crash-1", *paths("crash"), endpoint=endpoint)
        check(not mounts_under(f"{WORK}/crashy/") and not mounts_under(target("crash")),
              "7. unmount leaves no mount of that volume")
    finally:
        p.terminate()
        p.wait(timeout=10)


def scenario_teardown(volume_id):
    ctl_ok("unmount", volume_id, *paths("data"))
    kubectl("delete", "pvc", "data", "existing", "-n", "team", "--wait=true")
    try:
        wait("every PV to be deleted", 60, lambda: not get("pv")["items"])
        check(True, "8. every PV is gone (ours and the backing ones)")
    except RuntimeError as e:
        check(False, f"8. every PV is gone: {e}: {[p['metadata']['name'] for p in get('pv')['items']]}")
    check(not get("pvc", ns="csi-interposer")["items"], "8. no backing claim is left")
    check(not get("volumeattachments")["items"], "8. no VolumeAttachment is left")
    check(not mounts_under(WORK + "/kubelet") and not mounts_under(WORK + "/ours"),
          "8. no mount of ours is left")
    left = run("pgrep", "-f", f"interposer-fs {WORK}/ours").stdout.split()
    check(not left, f"8. no interposer-fs process of ours is left ({left})")
    check(not os.listdir(f"{WORK}/ours/state/lower") and not os.listdir(f"{WORK}/ours/state/controller"),
          "8. no volume record is left")
    check(not os.listdir(f"{WORK}/lower/data") or os.listdir(f"{WORK}/lower/data") == ["ephemeral"],
          "8. the lower driver's data directories are deleted")


def main():
    try:
        vid = scenario_provision_and_data()
        scenario_live_tuning()
        scenario_static_wrap()
        scenario_missing_socket()
        scenario_never_binds()
        scenario_wait_for_first_consumer()
        scenario_restart_mid_stage()
        scenario_teardown(vid)
    except Exception as e:  # a step that could not even run is a failure, reported as such
        check(False, f"scenario aborted: {e}")
    print(f"stacking: {checks} checks, {len(failures)} failed")
    sys.exit(1 if failures or checks < 30 else 0)


if __name__ == "__main__":
    main()
