#!/usr/bin/env python3
"""Offline checks of deploy/: the Kubernetes manifests against the API schemas
(kubernetes-validate --strict), the cross-references between them, and the Prometheus files
(promtool). Exits non-zero with the problems listed. Run by testnet/tests/deploy.rs."""

import json
import pathlib
import subprocess
import sys
import tomllib

import yaml

HERE = pathlib.Path(__file__).resolve().parent
K8S = HERE / "k8s"
problems = []


def problem(msg):
    problems.append(msg)


def docs():
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out.append((f.name, d))
    return out


def kubernetes_validate(files):
    core = [str(f) for f in files if "monitoring.coreos.com" not in f.read_text()]
    r = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *core],
                       capture_output=True, text=True)
    if r.returncode != 0 or "ERROR" in r.stdout + r.stderr:
        problem(f"kubernetes-validate failed:\n{r.stdout}{r.stderr}")


def by_kind(all_docs, kind):
    return [d for _, d in all_docs if d.get("kind") == kind]


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_references(all_docs):
    services = by_kind(all_docs, "Service")
    configmaps = {d["metadata"]["name"]: d for d in by_kind(all_docs, "ConfigMap")}
    workloads = by_kind(all_docs, "StatefulSet") + by_kind(all_docs, "DaemonSet")
    if len(workloads) != 2:
        problem(f"expected the seed StatefulSet and the node DaemonSet, found {len(workloads)}")
    for w in workloads:
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        tlabels = w["spec"]["template"]["metadata"]["labels"]
        if not labels_match(w["spec"]["selector"]["matchLabels"], tlabels):
            problem(f"{name}: selector does not match its pod labels")
        c = spec["containers"][0]
        if c.get("command") != ["/usr/bin/df"]:
            problem(f"{name}: command must be [/usr/bin/df] (the image's entry point is the testnet's)")
        args = c["args"]
        cfg_path = args[args.index("--config") + 1]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        cfg_mount = next((m for m in mounts.values() if cfg_path.startswith(m["mountPath"] + "/")), None)
        if cfg_mount is None:
            problem(f"{name}: --config {cfg_path} is not under a mounted volume")
            continue
        cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
        key = cfg_path[len(cfg_mount["mountPath"]) + 1:]
        cm = configmaps.get(cm_name)
        if cm is None or key not in cm["data"]:
            problem(f"{name}: config {cm_name}/{key} does not exist")
            continue
        cfg = tomllib.loads(cm["data"][key])
        # The ports the pods expose are the ones the config listens on.
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        metrics_port = int(cfg["metrics_listen"].rsplit(":", 1)[1])
        data_port = int(cfg["data_listen"].rsplit(":", 1)[1])
        p2p_port = int(cfg["listen"][0].split("/tcp/")[1].split("/")[0])
        for pname, want in [("metrics", metrics_port), ("data", data_port), ("p2p", p2p_port)]:
            if ports.get(pname) != want:
                problem(f"{name}: port {pname} is {ports.get(pname)}, the config says {want}")
        for probe in ["readinessProbe", "livenessProbe"]:
            port = c[probe]["httpGet"]["port"]
            if port not in (metrics_port, "metrics"):
                problem(f"{name}: {probe} on port {port}, metrics_listen is {metrics_port}")
        # Services in front of these pods use the same port numbers.
        for svc in services:
            if labels_match(svc["spec"]["selector"], tlabels):
                for sp in svc["spec"]["ports"]:
                    if ports.get(sp["name"]) != sp["port"]:
                        problem(f"Service {svc['metadata']['name']}: port {sp['name']} is {sp['port']}, {name} serves it on {ports.get(sp['name'])}")
        if c["readinessProbe"]["httpGet"]["path"] != "/readyz":
            problem(f"{name}: readiness probe is not /readyz")
        # The swarm key is mounted where the config reads it.
        key_path = cfg["network"]["swarm_key"]
        if not any(m["mountPath"] == key_path for m in mounts.values()):
            problem(f"{name}: swarm_key {key_path} is not mounted")
        data_dir = cfg["data_dir"]
        if not any(m["mountPath"] == data_dir for m in mounts.values()):
            problem(f"{name}: data_dir {data_dir} is not a mounted volume")
        # Bootstrap names are the seeds' StatefulSet DNS names.
        for b in cfg.get("bootstrap", []):
            host = b.split("/")[2]
            parts = host.split(".")
            if not (parts[0].startswith("df-seed-") and parts[1] == "df-seed" and parts[2] == "df"):
                problem(f"{name}: bootstrap {b} is not a df-seed pod name")
        if w["kind"] == "DaemonSet":
            if not spec.get("hostNetwork"):
                problem(f"{name}: nodes must use the host network (the mirror is on the host's loopback)")
            if spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
                problem(f"{name}: on the host network, dnsPolicy must be ClusterFirstWithHostNet to resolve the seeds")
            if not cfg["proxy"]["listen"].startswith("127.0.0.1:"):
                problem(f"{name}: the mirror must listen on loopback")
            if volumes[mounts["data"]["name"]].get("hostPath") is None:
                problem(f"{name}: the node's data dir must be a hostPath")
        if w["kind"] == "StatefulSet":
            svc = w["spec"]["serviceName"]
            s = next((s for s in services if s["metadata"]["name"] == svc), None)
            if s is None or s["spec"].get("clusterIP") != "None":
                problem(f"{name}: serviceName {svc} is not a headless Service")
            elif not labels_match(s["spec"]["selector"], tlabels):
                problem(f"{name}: Service {svc} does not select its pods")
            if not w["spec"].get("volumeClaimTemplates"):
                problem(f"{name}: seeds need a volume claim each")

    # Scrape objects select Services that exist and name their ports.
    for sm in by_kind(all_docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in services if labels_match(sel, s["metadata"].get("labels", {}))]
        if not targets:
            problem(f"ServiceMonitor {sm['metadata']['name']} selects no Service")
        for ep in sm["spec"]["endpoints"]:
            for s in targets:
                if ep["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                    problem(f"ServiceMonitor {sm['metadata']['name']}: Service {s['metadata']['name']} has no port {ep['port']}")
            if ep["path"] != "/metrics":
                problem(f"ServiceMonitor {sm['metadata']['name']}: path {ep['path']}")


def check_prometheus():
    for args in (["check", "rules", str(HERE / "prometheus/alerts.yml")],
                 ["check", "config", str(HERE / "prometheus/prometheus.yml")]):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True)
        if r.returncode != 0:
            problem(f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")
    dash = json.loads((HERE / "grafana/df-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        problem("dashboard panel ids repeat")
    for p in dash["panels"]:
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            problem(f"dashboard panel {p['title']!r} has no query")


def check_runtime_configs():
    hosts = tomllib.loads((HERE / "containerd/hosts.toml").read_text())
    mirrors = [h for h in hosts.get("host", {}) if h.startswith("http://127.0.0.1:")]
    if not mirrors or "pull" not in hosts["host"][mirrors[0]]["capabilities"]:
        problem("containerd/hosts.toml: no pull mirror on loopback")
    daemon = json.loads((HERE / "docker/daemon.json").read_text())
    if not daemon.get("registry-mirrors"):
        problem("docker/daemon.json: no registry-mirrors")
    node_cfg = next(d for _, d in docs() if d.get("kind") == "ConfigMap")["data"]["node.toml"]
    mirror = "http://" + tomllib.loads(node_cfg)["proxy"]["listen"]
    if mirror not in daemon["registry-mirrors"] or mirror not in hosts["host"]:
        problem(f"the runtime configs do not point at the node's mirror {mirror}")


def main():
    kubernetes_validate(sorted(K8S.glob("*.yaml")))
    all_docs = docs()
    check_references(all_docs)
    check_prometheus()
    check_runtime_configs()
    if problems:
        print("\n".join(problems))
        return 1
    print(f"deploy/ ok: {len(all_docs)} Kubernetes objects, Prometheus rules and config, dashboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
