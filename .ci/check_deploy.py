#!/usr/bin/env python3
"""Checks on deploy/kubernetes that schema validation cannot make (run by .ci/lint-deploy.sh).

kubernetes-validate checks field names and types, not values: `restartPolicy: Sometimes` or a
sidecar that lost its read-only mount pass it. This checks the conventions of
docs/operations.md on the rendered manifests, and that the manifests agree with the pmad
config they mount (port, shutdown grace, memory budget, output paths).

usage: check_deploy.py MANIFEST.yaml... [--config pmad.toml]
(without --config, the TOML is read from the ConfigMap mounted at /etc/pmad)
"""

from __future__ import annotations

import re
import sys
import tomllib

import yaml

errors: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok:   " if ok else "FAIL: ") + what)
    if not ok:
        errors.append(what)


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"duration {text!r}")
    return float(m[1]) * units[m[2]]


def size_bytes(text: str) -> int:
    units = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKMGT]?i?)B?\s*", str(text))
    if not m:
        raise ValueError(f"size {text!r}")
    return int(float(m[1]) * units[m[2]])


def main(argv: list[str]) -> int:
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    docs = []
    for path in argv:
        with open(path, encoding="utf-8") as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    jobs = [d for d in docs if d.get("kind") == "Job"]
    check(len(jobs) == 1, "exactly one Job")
    if not jobs:
        return 1
    pod = jobs[0]["spec"]["template"]
    spec = pod["spec"]
    psc = spec.get("securityContext", {})

    # Pod Security "restricted" and docs/operations.md.
    check(psc.get("runAsNonRoot") is True, "pod: runAsNonRoot: true")
    check(psc.get("runAsUser") == 65532, "pod: runAsUser: 65532")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod: seccompProfile RuntimeDefault")
    check(psc.get("fsGroupChangePolicy") == "OnRootMismatch", "pod: fsGroupChangePolicy: OnRootMismatch")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc = c.get("securityContext", {})
        n = c["name"]
        check(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation: false")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{n}: capabilities drop ALL")
        check(sc.get("privileged") is not True, f"{n}: not privileged")

    # The sidecar.
    side = [c for c in spec.get("initContainers", []) if c["name"] == "pmad"]
    check(len(side) == 1, "pmad is an init container")
    if not side:
        return 1
    c = side[0]
    sc = c.get("securityContext", {})
    check(c.get("restartPolicy") == "Always", "pmad: restartPolicy: Always (native sidecar)")
    check(sc.get("readOnlyRootFilesystem") is True, "pmad: readOnlyRootFilesystem: true")
    check(sc.get("runAsUser", psc.get("runAsUser")) == 65532, "pmad: runs as 65532")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pmad: seccompProfile RuntimeDefault")
    probes = {k: c.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    check(probes["startupProbe"].get("path") == "/healthz", "pmad: startupProbe on /healthz")
    check(probes["livenessProbe"].get("path") == "/healthz", "pmad: livenessProbe on /healthz")
    check(probes["readinessProbe"].get("path") == "/readyz", "pmad: readinessProbe on /readyz")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for k, p in probes.items():
        port = p.get("port")
        check(port in ports or port in ports.values(), f"pmad: {k} port {port!r} is a container port")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        check("memory" in res.get(kind, {}) and "cpu" in res.get(kind, {}), f"pmad: cpu and memory {kind}")

    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    # The config it mounts.
    if config_path:
        with open(config_path, "rb") as f:
            cfg = tomllib.load(f)
    else:
        cm_name = volumes.get(mounts.get("/etc/pmad", {}).get("name"), {}).get("configMap", {}).get("name")
        cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
        check(len(cms) == 1, f"pmad: mounted ConfigMap {cm_name!r} is in the manifests")
        if not cms:
            return 1
        cfg = tomllib.loads(cms[0]["data"]["pmad.toml"])
    check(c.get("args", [])[-1:] == ["/etc/pmad/pmad.toml"] and "/etc/pmad" in mounts,
          "pmad: runs the config mounted at /etc/pmad/pmad.toml")

    watch_dir = cfg["watch"]["dir"]
    check(mounts.get(watch_dir, {}).get("readOnly") is True, f"pmad: watch.dir {watch_dir} mounted read-only")
    trainer_mounts = {m["name"]: m["mountPath"] for t in spec["containers"] for m in t.get("volumeMounts", [])}
    check(mounts.get(watch_dir, {}).get("name") in trainer_mounts, f"trainer shares the volume at {watch_dir}")
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    for r in cfg.get("recipe", []):
        out = r["out_dir"]
        check(any(out == p or out.startswith(p.rstrip("/") + "/") for p in writable) and
              not out.startswith(watch_dir.rstrip("/") + "/"),
              f"recipe {r['name']}: out_dir {out} on a writable mount, outside watch.dir")
    listen = cfg.get("server", {}).get("listen", "")
    port = int(listen.rsplit(":", 1)[1]) if listen else None
    check(port is not None and not listen.startswith("127."), f"server.listen {listen!r} reachable by probes")
    check(port in ports.values(), f"server.listen port {port} is the container port")
    ann = pod["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port)
          and ann.get("prometheus.io/path") == "/metrics", "prometheus.io annotations match /metrics on the port")
    check(cfg.get("log", {}).get("format") == "json", "log.format = json")
    grace = seconds(cfg.get("daemon", {}).get("shutdown_grace", "20s"))
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    check(tgps >= grace + 30, f"terminationGracePeriodSeconds {tgps} >= shutdown_grace {grace:g}s + 30s")
    budget = cfg.get("state", {}).get("memory_budget", "auto")
    limit = res.get("limits", {}).get("memory")
    if budget != "auto" and limit:
        check(size_bytes(budget) < size_bytes(limit), f"state.memory_budget {budget} < memory limit {limit}")

    print(f"{len(errors)} failed" if errors else "all checks passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
