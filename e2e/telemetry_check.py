#!/usr/bin/env python3
"""Telemetry end to end: a scripted workload in a volume published through the CSI API, then
assertions over Jaeger's HTTP query API and Prometheus's HTTP API, a Jaeger outage in the middle
of I/O, and every PromQL expression of the Grafana dashboard evaluated against real data.

Run by e2e/telemetry.sh, which starts Jaeger, Prometheus and the driver and passes:
  telemetry_check.py TARGET VOLUME_ID JAEGER_URL PROMETHEUS_URL DASHBOARD_JSON RESTART_JAEGER_CMD JAEGER_PIDFILE
"""
import errno
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

target, volume, jaeger, prom, dashboard, restart_cmd, jaeger_pidfile = sys.argv[1:8]
failures = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def wait_for(what, fn, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception:
            pass
        time.sleep(0.5)
    check(False, what + f" (waited {timeout} s)")
    return None


# --- 1. The workload --------------------------------------------------------------------------
os.chdir(target)
os.mkdir("d")
fd = os.open("d/a.txt", os.O_CREAT | os.O_WRONLY, 0o644)
for _ in range(5):
    os.write(fd, b"x" * 4096)
os.fsync(fd)
os.close(fd)
with open("d/a.txt", "rb") as f:
    assert len(f.read()) == 20480
os.rename("d/a.txt", "d/b.txt")
with open("d/b.txt", "rb") as f:
    assert len(f.read()) == 20480
os.unlink("d/b.txt")
open("x.doomed", "wb").close()
try:
    os.unlink("x.doomed")
    check(False, "the injected fault fails unlink of x.doomed")
except OSError as e:
    check(e.errno == errno.EACCES, f"the injected fault fails unlink of x.doomed with EACCES (got {e.errno})")
os.chdir("/")

# --- 2. Jaeger: spans with names, paths, sessions, fault, pod/PVC ------------------------------
def spans():
    data = get_json(f"{jaeger}/api/traces?service=interposer-fs&limit=2000&lookback=1h")["data"]
    out = []
    for t in data:
        for s in t["spans"]:
            s["_process"] = t["processes"][s["processID"]]
            s["_tags"] = {x["key"]: x["value"] for x in s["tags"]}
            out.append(s)
    return out


def find(ss, name, path):
    return [s for s in ss if s["operationName"] == name and s["_tags"].get("file.path") == path]


ss = wait_for("Jaeger has the workload's spans",
              lambda: (lambda x: x if find(x, "unlink", "x.doomed") and find(x, "read", "d/b.txt") else None)(spans()))
ss = ss or []
by_id = {s["spanID"]: s for s in ss}
for name, path in [("mkdir", "d"), ("create", "d/a.txt"), ("write", "d/a.txt"), ("fsync", "d/a.txt"),
                   ("read", "d/a.txt"), ("rename", "d/a.txt"), ("read", "d/b.txt"), ("unlink", "d/b.txt")]:
    check(bool(find(ss, name, path)), f"span {name} with file.path={path}")
rename = find(ss, "rename", "d/a.txt")
check(bool(rename) and rename[0]["_tags"].get("interposer.new_path") == "d/b.txt", "rename span carries the new path d/b.txt")
writes = find(ss, "write", "d/a.txt")
check(len(writes) == 5, f"5 write spans (got {len(writes)})")
if writes:
    w = writes[0]
    parent = next((by_id.get(r["spanID"]) for r in w.get("references", []) if r["refType"] == "CHILD_OF"), None)
    check(parent is not None and parent["operationName"] == "file.session" and parent["_tags"].get("file.path") == "d/a.txt",
          "writes are children of the file.session span of d/a.txt")
    check(w["_tags"].get("process.pid") is not None and w["_tags"].get("process.user.id") == 0, "write spans carry the caller (pid, uid)")
    check(w["_tags"].get("interposer.size") == 4096, "write spans carry the size")
    proc = {t["key"]: t["value"] for t in w["_process"]["tags"]}
    check(proc.get("k8s.pvc.name") == "data" and proc.get("k8s.pvc.namespace") == "team", "resource attributes carry the PVC")
    check(proc.get("interposer.volume.id") == volume and proc.get("k8s.node.name") is not None, "resource attributes carry volume and node")
    check(proc.get("k8s.pod.name") == "app-0" and proc.get("k8s.namespace.name") == "team", "resource attributes carry the pod from podInfoOnMount")
read_after = find(ss, "read", "d/b.txt")
check(bool(read_after), "reads after the rename show the new path")
fault = find(ss, "unlink", "x.doomed")
if fault:
    f = fault[0]
    check(f["_tags"].get("error.type") == "EACCES", "the fault's span has error.type=EACCES")
    events = [fld["value"] for log in f.get("logs", []) for fld in log["fields"] if fld["key"] == "event"]
    check("fault.injected" in events, "the fault's span has a fault.injected event")
tagged = get_json(f"{jaeger}/api/traces?service=interposer-fs&limit=50&lookback=1h&tags=" +
                  urllib.parse.quote(json.dumps({"k8s.pod.name": "app-0"})))["data"]
check(len(tagged) > 0, "Jaeger search by pod finds traces")

# --- 3. Prometheus: counters equal what the workload did -------------------------------------
def q(expr):
    r = get_json(f"{prom}/api/v1/query?query=" + urllib.parse.quote(expr))
    return r["data"]["result"]


def value(expr):
    res = q(expr)
    return float(res[0]["value"][1]) if res else None


sel = f'volume="{volume}"'
wait_for("Prometheus scraped the workload",
         lambda: value(f'interposer_operations_total{{{sel},op="unlink",result="EACCES"}}') == 1)
expected = {
    f'interposer_operations_total{{{sel},op="mkdir",result="ok"}}': 1,
    f'interposer_operations_total{{{sel},op="write",result="ok"}}': 5,
    f'interposer_operations_total{{{sel},op="fsync",result="ok"}}': 1,
    f'interposer_operations_total{{{sel},op="rename",result="ok"}}': 1,
    f'interposer_operations_total{{{sel},op="unlink",result="ok"}}': 1,
    f'interposer_operations_total{{{sel},op="unlink",result="EACCES"}}': 1,
    f'sum(interposer_operations_total{{{sel},op="create"}})': 2,
    f'interposer_written_bytes_total{{{sel}}}': 20480,
    f'interposer_read_bytes_total{{{sel}}}': 40960,
    f'interposer_faults_injected_total{{{sel},op="unlink",kind="errno"}}': 1,
    f'interposer_operation_duration_seconds_count{{{sel},op="write"}}': 5,
    f'csi_interposer_volume_up{{{sel}}}': 1,
}
for expr, want in expected.items():
    got = value(expr)
    check(got == want, f"{expr} = {want} (got {got})")
check((value(f'interposer_throttle_wait_seconds_total{{{sel},direction="write"}}') or 0) > 0, "throttle waits show in Prometheus")
check((value(f'interposer_trace_spans_total{{{sel},outcome="exported"}}') or 0) > 0, "exported spans show in Prometheus")
check(value(f'interposer_trace_spans_total{{{sel},outcome="failed"}}') == 0, "no span failed while Jaeger was up")
check(value(f'interposer_trace_spans_total{{{sel},outcome="dropped"}}') == 0, "no span was dropped from the export queue")

# --- 4. The dashboard's every query parses and evaluates on real data -------------------------
dash = json.load(open(dashboard))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
names = set(get_json(f"{prom}/api/v1/label/__name__/values")["data"])
for e in exprs:
    concrete = e.replace("$__rate_interval", "1m").replace('"$volume"', '".*"')
    r = get_json(f"{prom}/api/v1/query?query=" + urllib.parse.quote(concrete))
    check(r["status"] == "success", f"dashboard query evaluates: {concrete}")
    for m in re.findall(r"\b((?:interposer|csi_interposer)_[a-z_]+)", e):
        check(m in names, f"dashboard metric {m} exists in Prometheus")

# --- 5. Jaeger down in the middle of I/O: no error, no stall; spans resume after -------------
os.kill(int(open(jaeger_pidfile).read().strip()), 9)
time.sleep(0.5)
check(subprocess.run(["curl", "-sf", f"{jaeger}/api/services"], capture_output=True).returncode != 0, "Jaeger is down")
t0 = time.time()
ok = 0
for i in range(200):
    with open(os.path.join(target, f"outage-{i % 10}.txt"), "wb") as f:
        f.write(b"still writing")
        ok += 1
took = time.time() - t0
check(ok == 200, f"200 of 200 writes succeeded with Jaeger down ({ok})")
check(took < 30, f"I/O did not stall behind the dead collector ({took:.2f} s for 200 files)")
wait_for("the spans Jaeger never took show as failed in Prometheus",
         lambda: (value(f'interposer_trace_spans_total{{{sel},outcome="failed"}}') or 0) > 0, 60)
subprocess.Popen(["bash", "-c", restart_cmd])
wait_for("Jaeger is back", lambda: get_json(f"{jaeger}/api/services"), 60)
deadline = time.time() + 60
found = False
while time.time() < deadline and not found:
    with open(os.path.join(target, "after-restart.txt"), "wb") as f:
        f.write(b"back")
    time.sleep(1)
    try:
        found = bool(find(spans(), "write", "after-restart.txt"))
    except Exception:
        pass
check(found, "spans arrive again once Jaeger is back")

print(f"telemetry: {len(failures)} failed")
sys.exit(1 if failures else 0)
