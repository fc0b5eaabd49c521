#!/usr/bin/env python3
"""Checks over the chart's rendered manifests (called by e2e/chart.sh with the rendered files).

- socket paths agree between the driver, node-driver-registrar, livenessprobe, provisioner and
  kubelet's plugin directory;
- only the container that mounts is privileged or uses Bidirectional propagation;
- every image has an explicit tag;
- the RBAC rules are exactly external-provisioner's needs, since the driver's code calls no
  Kubernetes API (checked by searching the code for a Kubernetes client).
"""
import glob
import os
import re
import sys

import yaml

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
failures = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        failures.append(what)


for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    print(f"--- {os.path.basename(path)}: {len(docs)} objects")
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ds = next((d for d in docs if d["kind"] == "DaemonSet"), None)
    check(ds is not None, "a node DaemonSet is rendered")
    if ds is None:
        continue
    spec = ds["spec"]["template"]["spec"]
    cs = {c["name"]: c for c in spec["containers"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    driver = cs["csi-interposer"]
    endpoint = next(a.split("=", 1)[1] for a in driver["args"] if a.startswith("--endpoint="))
    sock_host = endpoint.removeprefix("unix://")
    plugin_mount = next(m for m in driver["volumeMounts"] if m["name"] == "plugin-dir")
    check(vols["plugin-dir"]["hostPath"]["path"] == plugin_mount["mountPath"] == os.path.dirname(sock_host),
          f"driver socket {sock_host} is inside the plugin hostPath at the same path")
    reg = cs["node-driver-registrar"]
    reg_path = next(a.split("=", 1)[1] for a in reg["args"] if a.startswith("--kubelet-registration-path="))
    check(reg_path == sock_host, "registrar tells kubelet the driver's socket path")
    for name in ["node-driver-registrar", "liveness-probe", "csi-provisioner"]:
        c = cs[name]
        addr = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--csi-address="))
        mnt = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "plugin-dir")
        check(addr == os.path.join(mnt, os.path.basename(sock_host)), f"{name} reaches the same socket ({addr})")
    check(vols["registration-dir"]["hostPath"]["path"].endswith("/plugins_registry"), "registration dir is kubelet's plugins_registry")
    for name, c in cs.items():
        priv = c.get("securityContext", {}).get("privileged", False)
        bidir = any(m.get("mountPropagation") == "Bidirectional" for m in c.get("volumeMounts", []))
        mounts = name == "csi-interposer"
        check(priv == mounts and bidir == mounts, f"{name}: privileged={priv} bidirectional={bidir} (only the mounting container)")
    images = [c["image"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]]
    for img in images:
        check(re.search(r":[A-Za-z0-9._-]+$", img.split("/")[-1]) is not None and not img.endswith(":latest"),
              f"image {img} has an explicit tag")
    # RBAC: exactly the provisioner's rules, since our code calls no Kubernetes API.
    code = "".join(open(f).read() for f in glob.glob(os.path.join(repo, "*/src/**/*.rs"), recursive=True))
    cargo = "".join(open(f).read() for f in glob.glob(os.path.join(repo, "*/Cargo.toml")))
    check(not re.search(r"\bkube\b|k8s-openapi", cargo) and "kube::" not in code,
          "the driver's code has no Kubernetes client, so it needs no RBAC of its own")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    got = sorted((r["apiGroups"][0], res, v) for r in role["rules"] for res in r["resources"] for v in r["verbs"])
    want = sorted([("", "persistentvolumes", v) for v in ["get", "list", "watch", "create", "patch", "delete"]]
                  + [("", "persistentvolumeclaims", v) for v in ["get", "list", "watch", "update"]]
                  + [("storage.k8s.io", "storageclasses", v) for v in ["get", "list", "watch"]]
                  + [("", "events", v) for v in ["list", "watch", "create", "update", "patch"]]
                  + [("storage.k8s.io", "csinodes", v) for v in ["get", "list", "watch"]]
                  + [("", "nodes", v) for v in ["get", "list", "watch"]])
    check(got == want, "ClusterRole has exactly external-provisioner's (node-deployment) rules")
    csidriver = next(d for d in docs if d["kind"] == "CSIDriver")
    check(csidriver["spec"]["attachRequired"] is False and csidriver["spec"]["podInfoOnMount"] is True,
          "CSIDriver: no attach, podInfoOnMount")
    check(set(csidriver["spec"]["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}, "CSIDriver: persistent and ephemeral")

print(f"chart: {len(failures)} failed")
sys.exit(1 if failures else 0)
