#!/usr/bin/env python3
"""Checks on the Kubernetes manifests that schema validation cannot make (run by .ci/lint-deploy.sh).

kubernetes-validate checks field names and types, not values: `restartPolicy: Sometimes` or a
sidecar that lost its read-only mount pass it. This checks the conventions of
docs/operations.md on the rendered manifests, and that the manifests agree with the pmad
config they mount (port, shutdown grace, memory budget, output paths). For the multi-node
manifests (docs/multinode.md) also: every instance gets a distinct partition index from its
launcher and the count the launcher runs, a state.dir of its own, and shared volumes.

Pods are found wherever pmad runs: a Job's pod with pmad as a native sidecar, every pod
template of a JobSet or a LeaderWorkerSet, and the Jobs of a split one-shot merge (pmad merge
--partition / --commit as the main container).

usage: check_deploy.py MANIFEST.yaml... [--config pmad.toml]
       check_deploy.py --extract DIR MANIFEST.yaml...
(without --config, the TOML is read from the ConfigMap mounted at /etc/pmad. --extract splits
the manifests for the validators: DIR/k8s.yaml with the built-in objects and the templates
inside JobSets and LeaderWorkerSets as batch/v1 Jobs and v1 PodTemplates, for
kubernetes-validate; DIR/jobset-<name>.yaml and DIR/leaderworkerset-<name>.yaml, one custom
resource each, for check-jsonschema.)
"""

from __future__ import annotations

import os
import re
import sys
import tomllib

import yaml

errors: list[str] = []

# What each launcher injects into every container and init container of its pods, so pmad's
# "auto" partition and $(VAR) references (subPathExpr, args) may use it without declaring it:
# the Job controller (Indexed Jobs, hence JobSets) and the LeaderWorkerSet pod webhook.
INJECTED = {
    "Job": {"JOB_COMPLETION_INDEX"},
    "JobSet": {"JOB_COMPLETION_INDEX"},
    "LeaderWorkerSet": {"LWS_WORKER_INDEX", "LWS_GROUP_SIZE", "LWS_LEADER_ADDRESS"},
}
INDEX_VAR = {"JobSet": "JOB_COMPLETION_INDEX", "LeaderWorkerSet": "LWS_WORKER_INDEX"}


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


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def mount_of(path: str, mounts: dict[str, dict]) -> dict | None:
    """The volume mount a path lies on (the longest mount path that contains it)."""
    best = None
    for p, m in mounts.items():
        if under(path, p) and (best is None or len(p) > len(best[0])):
            best = (p, m)
    return best[1] if best else None


def env_names(c: dict) -> set[str]:
    return {e["name"] for e in c.get("env", [])}


def var_refs(text: str) -> set[str]:
    return set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text))


def pvc_access(docs: list[dict], volumes: dict, name: str) -> list[str] | None:
    """Access modes of the PVC behind volume `name`, when the manifests hold it."""
    claim = volumes.get(name, {}).get("persistentVolumeClaim", {}).get("claimName")
    for d in docs:
        if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim:
            return d["spec"].get("accessModes", [])
    return None


def restricted(label: str, spec: dict) -> dict:
    """Pod Security "restricted" and docs/operations.md, for every container of a pod."""
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{label} pod: runAsNonRoot: true")
    check(psc.get("runAsUser") == 65532, f"{label} pod: runAsUser: 65532")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label} pod: seccompProfile RuntimeDefault")
    check(psc.get("fsGroupChangePolicy") == "OnRootMismatch", f"{label} pod: fsGroupChangePolicy: OnRootMismatch")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc = c.get("securityContext", {})
        n = f"{label} {c['name']}"
        check(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation: false")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{n}: capabilities drop ALL")
        check(sc.get("privileged") is not True, f"{n}: not privileged")
        check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{n}: runs as non-root")
    return psc


def load_config(label: str, docs: list[dict], volumes: dict, mounts: dict, config_path: str | None) -> dict | None:
    if config_path:
        with open(config_path, "rb") as f:
            return tomllib.load(f)
    cm_name = volumes.get(mounts.get("/etc/pmad", {}).get("name"), {}).get("configMap", {}).get("name")
    cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
    check(len(cms) == 1, f"{label} pmad: mounted ConfigMap {cm_name!r} is in the manifests")
    if not cms:
        return None
    return tomllib.loads(cms[0]["data"]["pmad.toml"])


def sidecar_pod(label: str, pod: dict, docs: list[dict], config_path: str | None) -> tuple[dict, dict] | None:
    """A pod with pmad as a native sidecar beside the trainer: the single-node conventions.
    Returns (pmad container, its config) for the multi-node checks."""
    spec = pod["spec"]
    psc = restricted(label, spec)
    side = [c for c in spec.get("initContainers", []) if c["name"] == "pmad"]
    check(len(side) == 1, f"{label}: pmad is an init container")
    if not side:
        return None
    c = side[0]
    sc = c.get("securityContext", {})
    check(c.get("restartPolicy") == "Always", f"{label} pmad: restartPolicy: Always (native sidecar)")
    check(sc.get("readOnlyRootFilesystem") is True, f"{label} pmad: readOnlyRootFilesystem: true")
    check(sc.get("runAsUser", psc.get("runAsUser")) == 65532, f"{label} pmad: runs as 65532")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label} pmad: seccompProfile RuntimeDefault")
    probes = {k: c.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    check(probes["startupProbe"].get("path") == "/healthz", f"{label} pmad: startupProbe on /healthz")
    check(probes["livenessProbe"].get("path") == "/healthz", f"{label} pmad: livenessProbe on /healthz")
    check(probes["readinessProbe"].get("path") == "/readyz", f"{label} pmad: readinessProbe on /readyz")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for k, p in probes.items():
        port = p.get("port")
        check(port in ports or port in ports.values(), f"{label} pmad: {k} port {port!r} is a container port")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        check("memory" in res.get(kind, {}) and "cpu" in res.get(kind, {}), f"{label} pmad: cpu and memory {kind}")

    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    cfg = load_config(label, docs, volumes, mounts, config_path)
    if cfg is None:
        return None
    check(c.get("args", [])[-1:] == ["/etc/pmad/pmad.toml"] and "/etc/pmad" in mounts,
          f"{label} pmad: runs the config mounted at /etc/pmad/pmad.toml")

    watch_dir = cfg["watch"]["dir"]
    wm = mounts.get(watch_dir, {})
    check(wm.get("readOnly") is True, f"{label} pmad: watch.dir {watch_dir} mounted read-only")
    # The trainer must write where pmad watches: the same volume at the same path.
    trainer_mounts = {(m["name"], m["mountPath"]) for t in spec["containers"] for m in t.get("volumeMounts", [])}
    check((wm.get("name"), watch_dir) in trainer_mounts,
          f"{label}: trainer mounts volume {wm.get('name')!r} at watch.dir {watch_dir} too")
    for t in spec["containers"]:
        outs = [a.split("=", 1)[1] for a in t.get("args", []) if a.startswith("--output_dir=")]
        for o in outs:
            check(o == watch_dir, f"{label} {t['name']}: --output_dir {o} is watch.dir")
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    for r in cfg.get("recipe", []):
        out = r["out_dir"]
        check(any(under(out, p) for p in writable) and not out.startswith(watch_dir.rstrip("/") + "/"),
              f"{label} recipe {r['name']}: out_dir {out} on a writable mount, outside watch.dir")
    listen = cfg.get("server", {}).get("listen", "")
    port = int(listen.rsplit(":", 1)[1]) if listen else None
    check(port is not None and not listen.startswith("127."), f"{label} server.listen {listen!r} reachable by probes")
    check(port in ports.values(), f"{label} server.listen port {port} is the container port")
    ann = pod["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port)
          and ann.get("prometheus.io/path") == "/metrics", f"{label} prometheus.io annotations match /metrics on the port")
    check(cfg.get("log", {}).get("format") == "json", f"{label} log.format = json")
    grace = seconds(cfg.get("daemon", {}).get("shutdown_grace", "20s"))
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    check(tgps >= grace + 30, f"{label} terminationGracePeriodSeconds {tgps} >= shutdown_grace {grace:g}s + 30s")
    budget = cfg.get("state", {}).get("memory_budget", "auto")
    limit = res.get("limits", {}).get("memory")
    if budget != "auto" and limit:
        check(size_bytes(budget) < size_bytes(limit), f"{label} state.memory_budget {budget} < memory limit {limit}")
    return c, cfg


def multinode_pod(label: str, launcher: str, count: int, spec: dict, c: dict, cfg: dict, docs: list[dict]) -> None:
    """One pod of a multi-node run: its pmad must resolve a distinct index and this count."""
    part = cfg.get("partition")
    check(part is not None, f"{label}: pmad.toml has [partition]")
    if part is None:
        return
    declared = env_names(c)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    injected = INJECTED[launcher]
    idx_var = INDEX_VAR[launcher]
    # The index: "auto" from the launcher's variable, and nothing that would override it with
    # one value for every pod.
    check(part.get("index", "auto") == "auto", f"{label}: partition.index = \"auto\" (one config for every pod)")
    check("PMAD_PARTITION_INDEX" not in declared,
          f"{label} pmad: no PMAD_PARTITION_INDEX in the pod spec (it would give every pod the same index)")
    # The count: what pmad resolves must be the number of pods.
    cfg_count = part.get("count", "auto")
    if isinstance(cfg_count, int):
        resolved, source = cfg_count, "partition.count"
    elif launcher == "LeaderWorkerSet":
        resolved, source = count, "LWS_GROUP_SIZE (injected)"
    else:
        v = env.get("PMAD_PARTITION_COUNT")
        resolved, source = (int(v) if v and v.isdigit() else None), "PMAD_PARTITION_COUNT"
    check(resolved == count, f"{label}: partition count {resolved} (from {source}) == {count} pods")
    # Every $(VAR) in the pmad container and the trainer is declared or injected.
    for t in spec.get("initContainers", []) + spec.get("containers", []):
        refs = set()
        for a in t.get("args", []) + t.get("command", []):
            refs |= var_refs(a)
        for m in t.get("volumeMounts", []):
            refs |= var_refs(m.get("subPathExpr", ""))
        missing = refs - env_names(t) - injected
        check(not missing, f"{label} {t['name']}: $(VAR) references are declared or injected by {launcher}"
              + (f" (missing: {', '.join(sorted(missing))})" if missing else ""))
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    # state.dir: one per instance (it is locked), on a per-index subPathExpr or a pod-local volume.
    sdir = cfg.get("state", {}).get("dir", "")
    sm = mount_of(sdir, mounts) if sdir else None
    per_index = sm is not None and f"$({idx_var})" in sm.get("subPathExpr", "")
    local = sm is not None and any(k in volumes.get(sm["name"], {}) for k in ("emptyDir", "ephemeral"))
    check(bool(sdir) and (per_index or local),
          f"{label} pmad: state.dir {sdir or '(none)'} is per instance (subPathExpr with $({idx_var}), or a pod-local volume)")
    # Shared volumes: the checkpoints every trainer writes and every pmad reads, and the outputs
    # (staging and the committer's rename need one filesystem for all instances).
    shared = {"watch.dir": cfg["watch"]["dir"]}
    shared.update({f"recipe {r['name']} out_dir": r["out_dir"] for r in cfg.get("recipe", [])})
    for what, path in shared.items():
        m = mount_of(path, mounts)
        modes = pvc_access(docs, volumes, m["name"]) if m else None
        if m and "persistentVolumeClaim" not in volumes.get(m["name"], {}):
            check(False, f"{label} pmad: {what} {path} is on a PersistentVolumeClaim shared by every pod")
        elif modes is not None:
            check("ReadWriteMany" in modes, f"{label} pmad: {what} {path} on a ReadWriteMany claim ({', '.join(modes)})")
    # torchrun's node count, when it is a literal.
    for t in spec.get("containers", []):
        for a in t.get("args", []):
            m = re.fullmatch(r"--nnodes=(\d+)", a)
            if m:
                check(int(m[1]) == count, f"{label} {t['name']}: torchrun --nnodes {m[1]} == {count} pods")


def jobset(d: dict, docs: list[dict], config_path: str | None) -> None:
    name = d["metadata"]["name"]
    for rj in d["spec"]["replicatedJobs"]:
        label = f"JobSet {name}/{rj['name']}"
        jspec = rj["template"]["spec"]
        pod = jspec["template"]
        found = sidecar_pod(label, pod, docs, config_path)
        if not found:
            continue
        c, cfg = found
        check(rj.get("replicas", 1) == 1,
              f"{label}: replicas 1 (each Job counts JOB_COMPLETION_INDEX from 0: more would repeat indexes)")
        check(jspec.get("completionMode", "Indexed") == "Indexed", f"{label}: completionMode Indexed")
        n = jspec.get("parallelism", 1)
        check(jspec.get("completions") == n, f"{label}: completions == parallelism ({n}): all parts run at once")
        check(pod["spec"].get("restartPolicy") == "Never" or d["spec"].get("failurePolicy") is not None,
              f"{label}: failures restart the run (restartPolicy Never + JobSet failurePolicy)")
        multinode_pod(label, "JobSet", n, pod["spec"], c, cfg, docs)


def leaderworkerset(d: dict, docs: list[dict], config_path: str | None) -> None:
    name = d["metadata"]["name"]
    lwt = d["spec"]["leaderWorkerTemplate"]
    size = lwt.get("size", 1)
    check(d["spec"].get("replicas", 1) == 1,
          f"LeaderWorkerSet {name}: replicas 1 (every group would publish into the same out_dir)")
    for key in ("leaderTemplate", "workerTemplate"):
        if key not in lwt:
            continue
        label = f"LeaderWorkerSet {name}/{key}"
        pod = lwt[key]
        check(pod["spec"].get("restartPolicy", "Always") == "Always",
              f"{label}: pod restartPolicy Always (StatefulSet pods)")
        found = sidecar_pod(label, pod, docs, config_path)
        if found:
            multinode_pod(label, "LeaderWorkerSet", size, pod["spec"], *found, docs)


def merge_args(c: dict) -> list[str]:
    return c.get("args", []) if c.get("args", [])[:1] == ["merge"] else []


def oneshot_jobs(jobs: list[dict]) -> None:
    """A split one-shot merge: an Indexed Job of `pmad merge --partition $(JOB_COMPLETION_INDEX)/N`
    pods and a Job of `pmad merge --commit` with otherwise the same arguments."""
    parts, commits = [], []
    for j in jobs:
        for c in j["spec"]["template"]["spec"].get("containers", []):
            a = merge_args(c)
            if any(x.startswith("--partition") for x in a):
                parts.append((j, c))
            elif "--commit" in a:
                commits.append((j, c))
    for j, c in parts + commits:
        label = f"Job {j['metadata']['name']}"
        spec = j["spec"]["template"]["spec"]
        restricted(label, spec)
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{label} pmad: readOnlyRootFilesystem: true")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        a = merge_args(c)
        out = next((x.split("=", 1)[1] for x in a if x.startswith("--out=")), None)
        inputs = [x for x in a[1:] if not x.startswith("-")]
        om = mount_of(out, mounts) if out else None
        check(om is not None and not om.get("readOnly"),
              f"{label} pmad: --out {out} on a writable mount")
        check(bool(inputs) and all((mount_of(i, mounts) or {}).get("readOnly") is True for i in inputs),
              f"{label} pmad: {len(inputs)} input checkpoints, on read-only mounts")
        check(not any(ch in x for x in inputs for ch in "*?["), f"{label} pmad: no globs (the image has no shell)")
    for j, c in parts:
        label = f"Job {j['metadata']['name']}"
        spec = j["spec"]
        p = next(x for x in merge_args(c) if x.startswith("--partition"))
        m = re.fullmatch(r"--partition=\$\(JOB_COMPLETION_INDEX\)/(\d+)", p)
        check(m is not None, f"{label}: --partition=$(JOB_COMPLETION_INDEX)/N ({p})")
        n = int(m[1]) if m else None
        check(spec.get("completionMode") == "Indexed", f"{label}: completionMode Indexed")
        check(spec.get("completions") == n and spec.get("parallelism") == n,
              f"{label}: completions and parallelism == N ({n})")
        matching = [cj for cj, cc in commits
                    if [x for x in merge_args(cc) if x != "--commit"] == [x for x in merge_args(c) if x != p]]
        check(len(matching) == 1, f"{label}: a commit Job with the same checkpoints and options")
        for cj in matching:
            check(cj["spec"].get("completions", 1) == 1 and cj["spec"].get("parallelism", 1) == 1,
                  f"Job {cj['metadata']['name']}: one commit at a time")
            cvols = {v["name"]: v for v in cj["spec"]["template"]["spec"].get("volumes", [])}
            pvols = {v["name"]: v for v in j["spec"]["template"]["spec"].get("volumes", [])}
            check(cvols == pvols, f"Job {cj['metadata']['name']}: the same volumes as {j['metadata']['name']}")


CUSTOM_KINDS = ("JobSet", "LeaderWorkerSet")


def extract(outdir: str, docs: list[dict]) -> int:
    """Splits rendered manifests for the validators: DIR/k8s.yaml holds every built-in object
    plus the templates inside JobSets (as batch/v1 Jobs) and LeaderWorkerSets (as v1
    PodTemplates), for kubernetes-validate; DIR/<kind>-<name>.yaml each custom resource, for
    check-jsonschema."""
    os.makedirs(outdir, exist_ok=True)
    core = [d for d in docs if d.get("kind") not in CUSTOM_KINDS]
    for d in docs:
        name = d["metadata"]["name"]
        if d.get("kind") == "JobSet":
            for rj in d["spec"]["replicatedJobs"]:
                t = rj["template"]
                core.append({"apiVersion": "batch/v1", "kind": "Job",
                             "metadata": {**t.get("metadata", {}), "name": f"{name}-{rj['name']}"},
                             "spec": t["spec"]})
                print(f"JobSet {name}: replicatedJob {rj['name']} -> Job {name}-{rj['name']}")
        elif d.get("kind") == "LeaderWorkerSet":
            for key in ("leaderTemplate", "workerTemplate"):
                t = d["spec"]["leaderWorkerTemplate"].get(key)
                if t is not None:
                    core.append({"apiVersion": "v1", "kind": "PodTemplate",
                                 "metadata": {"name": f"{name}-{key.lower()}"}, "template": t})
                    print(f"LeaderWorkerSet {name}: {key} -> PodTemplate {name}-{key.lower()}")
    with open(os.path.join(outdir, "k8s.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    # check-jsonschema takes one document per file.
    for d in docs:
        if d.get("kind") in CUSTOM_KINDS:
            path = os.path.join(outdir, f"{d['kind'].lower()}-{d['metadata']['name']}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                yaml.safe_dump(d, f, sort_keys=False)
    return 0


def main(argv: list[str]) -> int:
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    outdir = None
    if "--extract" in argv:
        i = argv.index("--extract")
        outdir = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    docs = []
    for path in argv:
        with open(path, encoding="utf-8") as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    if outdir is not None:
        return extract(outdir, docs)

    workloads = 0
    jobs = [d for d in docs if d.get("kind") == "Job"]
    for j in jobs:
        spec = j["spec"]["template"]["spec"]
        if any(c["name"] == "pmad" for c in spec.get("initContainers", [])):
            workloads += 1
            sidecar_pod(f"Job {j['metadata']['name']}", j["spec"]["template"], docs, config_path)
    merges = [j for j in jobs if any(merge_args(c) for c in j["spec"]["template"]["spec"].get("containers", []))]
    if merges:
        workloads += 1
        oneshot_jobs(merges)
    for d in docs:
        if d.get("kind") == "JobSet":
            workloads += 1
            jobset(d, docs, config_path)
        elif d.get("kind") == "LeaderWorkerSet":
            workloads += 1
            leaderworkerset(d, docs, config_path)
    check(workloads > 0, "the manifests run pmad (a sidecar Job, a JobSet, a LeaderWorkerSet or a split merge)")
    print(f"{len(errors)} failed" if errors else "all checks passed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
