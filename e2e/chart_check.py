#!/usr/bin/env python3
"""Checks over the chart's rendered manifests (called by e2e/chart.sh with the rendered files).

- socket paths agree between the driver, node-driver-registrar, livenessprobe, provisioner and
  kubelet's plugin directory;
- only the container that mounts is privileged or uses Bidirectional propagation;
- every image has an explicit tag;
- the RBAC rules are exactly what the programs call: external-provisioner's documented needs
  (+ leases when it leader-elects), and the driver's rules derived from the `RBAC:` line of each
  function in csi-driver/src/k8s.rs, the one module that may call the API (checked: no other
  source file builds an `Api`); namespace-scoped rules are a Role in the release namespace;
- with controller.enabled: a leader-elected provisioner in the Deployment, none in the nodes.
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
        if name not in cs:
            continue
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
    deployment = next((d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-controller")), None)
    if deployment is not None:
        dcs = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
        check("csi-provisioner" not in cs, "controller.enabled: the node plugins run no provisioner")
        check("--leader-election=true" in dcs["csi-provisioner"]["args"], "the controller's provisioner leader-elects")
        check("--stacked-only" in dcs["csi-interposer"]["args"], "the controller refuses dir volumes (--stacked-only)")
        for name, c in dcs.items():
            sc = c.get("securityContext", {})
            check(not sc.get("privileged", False) and not any("mountPropagation" in m for m in c.get("volumeMounts", [])),
                  f"controller {name}: not privileged, no mount propagation")
    else:
        check("csi-provisioner" in cs, "the node plugins provision (distributed mode)")

    def rules(kind, name_suffix):
        role = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)), None)
        if role is None:
            return None
        return sorted((g, res, v) for r in role["rules"] for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"])

    want = sorted([("", "persistentvolumes", v) for v in ["get", "list", "watch", "create", "patch", "delete"]]
                  + [("", "persistentvolumeclaims", v) for v in ["get", "list", "watch", "update"]]
                  + [("storage.k8s.io", "storageclasses", v) for v in ["get", "list", "watch"]]
                  + [("", "events", v) for v in ["list", "watch", "create", "update", "patch"]]
                  + [("storage.k8s.io", "csinodes", v) for v in ["get", "list", "watch"]]
                  + [("", "nodes", v) for v in ["get", "list", "watch"]])
    check(rules("ClusterRole", "-provisioner") == want, "provisioner ClusterRole: exactly external-provisioner's rules")
    lease = rules("Role", "-leader-election")
    check((lease is not None) == (deployment is not None), "a leases Role exactly when the provisioner leader-elects")
    # The driver's rules, derived from the code.
    k8s_rs = open(os.path.join(repo, "csi-driver/src/k8s.rs")).read()
    marks = re.findall(r'^\s*/// RBAC: (\S+) (\S+) (\S+) \((cluster|namespace)\)$', k8s_rs, re.M)
    code = {"cluster": [], "namespace": []}
    for group, res, verbs, scope in marks:
        code[scope] += [(group.strip('"'), res, v) for v in verbs.split(",")]
    fns = re.findall(r"((?:^\s*///.*\n)*)^\s*pub (?:async )?fn (\w+)", k8s_rs.split("impl Kube {", 1)[1].split("\n}\n", 1)[0], re.M)
    unmarked = [name for doc, name in fns if name != "connect" and "RBAC:" not in doc]
    check(len(marks) >= 10 and not unmarked, f"every Kube method names its RBAC rule ({len(marks)} marks; unmarked: {unmarked})")
    others = [f for f in glob.glob(os.path.join(repo, "*/src/**/*.rs"), recursive=True)
              if not f.endswith("csi-driver/src/k8s.rs") and re.search(r"\bApi::|kube::Client\b|kube::api\b", open(f).read())]
    check(not others, f"no other module calls the Kubernetes API ({others})")
    check(rules("ClusterRole", "-driver") == sorted(code["cluster"]),
          f"driver ClusterRole equals the code's cluster-wide calls ({len(code['cluster'])} rules)")
    check(rules("Role", "-driver") == sorted(code["namespace"]),
          f"driver Role (release namespace) equals the code's own-namespace calls ({len(code['namespace'])} rules)")
    csidriver = next(d for d in docs if d["kind"] == "CSIDriver")
    check(csidriver["spec"]["attachRequired"] is False and csidriver["spec"]["podInfoOnMount"] is True,
          "CSIDriver: no attach, podInfoOnMount")
    check(set(csidriver["spec"]["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}, "CSIDriver: persistent and ephemeral")

print(f"chart: {len(failures)} failed")
sys.exit(1 if failures else 0)
