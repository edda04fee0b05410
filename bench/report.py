#!/usr/bin/env python3
"""Turn bench/run.sh's raw measurements into results.md and merge_time.png.

    python bench/report.py RESULTS_DIR

Reads RESULTS_DIR/raw.tsv (one line per timed run), daemon.tsv, targets.tsv, checks.txt,
meta.txt and each section's <section>.txt; writes RESULTS_DIR/results.md (a Markdown table per
size and cache state, the targets, the daemon's numbers, the sections' reports, the agreement
checks, the machine's load) and, when matplotlib imports, RESULTS_DIR/merge_time.png (median
wall time vs checkpoint size per tool, warm cache; only when the dense section ran) and
RESULTS_DIR/targets.png (every target with a goal as measured / goal, and in a second panel
those reported without a goal, as measured). Only the standard library is needed for the tables.
"""
import csv
import math
import os
import statistics
import sys

TOOLS = ["floor", "floor1", "pmad", "mergekit", "torch"]
LABEL = {
    "floor": "I/O floor (parallel reads + write output + fsync)",
    "floor1": "I/O floor, one read stream (reference)",
    "pmad": "pmad merge --method sma",
    "mergekit": "mergekit linear (f32 -> bf16)",
    "torch": "torch_avg.py (safetensors.torch)",
}


def size_bytes(s):
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    u = s.upper()
    for k in sorted(units, key=len, reverse=True):
        if u.endswith(k):
            return float(u[: -len(k)]) * units[k]
    return float(u)


def best_floor(med, s, c):
    """The floor is the faster of the two read strategies (parallel, one stream) at this size
    and cache state: the least this machine needed to move the bytes."""
    fs = [med[s, c, t] for t in ("floor", "floor1") if (s, c, t) in med]
    return min(fs, key=lambda m: m["wall"]) if fs else None


SECTIONS = [
    ("moe", "Many small tensors (MoE shape) vs the I/O floor: bench/merge_vs_floor.sh --shape moe"),
    ("dcp", "DCP checkpoints (torchtitan layout) vs the I/O floor and two torch routes: bench/dcp.sh"),
    ("kernels", "One thread, each merge kernel: bench/merge_vs_floor.sh --threads 1, PMAD_KERNEL"),
    ("memory", "Peak RSS of pmad merge by K and threads (default --memory-budget)"),
    ("partition", "One merge split between processes: bench/partition.sh"),
    ("interference", "Beside a trainer: bench/interference.sh"),
]


def met(measured, goal, unit):
    """Whether a measured value meets its goal: every goal here is an upper bound."""
    try:
        return "yes" if float(measured) <= float(goal) else "NO"
    except ValueError:
        return ""


def main():
    d = sys.argv[1]
    rows = list(csv.DictReader(open(os.path.join(d, "raw.tsv")), delimiter="\t"))
    targets = []
    p = os.path.join(d, "targets.tsv")
    if os.path.exists(p):
        targets = list(csv.DictReader(open(p), delimiter="\t"))
    daemon = []
    p = os.path.join(d, "daemon.tsv")
    if os.path.exists(p):
        daemon = list(csv.DictReader(open(p), delimiter="\t"))
    sizes = sorted({r["size"] for r in rows}, key=size_bytes)
    caches = [c for c in ("warm", "cold") if any(r["cache"] == c for r in rows)]
    med = {}  # (size, cache, tool) -> dict
    for s in sizes:
        for c in caches:
            for t in TOOLS:
                rs = [r for r in rows if r["size"] == s and r["cache"] == c and r["tool"] == t]
                if not rs:
                    continue
                med[s, c, t] = {
                    "wall": statistics.median(float(r["wall_s"]) for r in rs),
                    "tool": statistics.median(float(r["tool_s"]) for r in rs),
                    "walls": [float(r["wall_s"]) for r in rs],
                    "rss": max(int(r["rss_kb"]) for r in rs) / 1024,
                    "cpu": statistics.median(float(r["user_s"]) + float(r["sys_s"]) for r in rs),
                    "n": len(rs),
                    "load": statistics.median(float(r["load1"]) for r in rs),
                }
    out = []
    w = out.append
    w("# pmad merge vs the I/O floor and the peers\n")
    meta = os.path.join(d, "meta.txt")
    if os.path.exists(meta):
        w("```text\n" + open(meta).read().rstrip() + "\n```\n")
    w("Wall times are medians of interleaved repetitions (tool order rotated every repetition) and")
    w("include the fsync of the output for every tool (`sync FILE` after mergekit and torch, which")
    w("do not fsync; their time without it is the last column). Ratios are of medians measured in")
    w("the same run. Peak RSS is the largest `/usr/bin/time` %M over the repetitions. \"ratio to")
    w("floor\" divides by the faster of the two floors (parallel reads or one stream) at that size")
    w("and cache state.\n")
    for s in sizes:
        for c in caches:
            if not any((s, c, t) in med for t in TOOLS):
                continue
            fl = best_floor(med, s, c)
            pm = med.get((s, c, "pmad"))
            n = max(m["n"] for (s2, c2, _), m in med.items() if s2 == s and c2 == c)
            w(f"## {s} per checkpoint, {c} cache ({n} reps)\n")
            w("| tool | wall median (s) | ratio to floor | ratio to pmad | peak RSS (MB) | CPU s (user+sys) | all walls (s) | wall w/o output fsync (s) |")
            w("|---|---:|---:|---:|---:|---:|---|---:|")
            for t in TOOLS:
                m = med.get((s, c, t))
                if not m:
                    continue
                rf = f"{m['wall'] / fl['wall']:.2f}x" if fl else "-"
                rp = f"{m['wall'] / pm['wall']:.2f}x" if pm else "-"
                walls = " ".join(f"{x:.2f}" for x in m["walls"])
                nosync = f"{m['tool']:.2f}" if t in ("mergekit", "torch") else "-"
                w(f"| {LABEL[t]} | {m['wall']:.2f} | {rf} | {rp} | {m['rss']:.0f} | {m['cpu']:.2f} | {walls} | {nosync} |")
            w("")
    if daemon:
        w("## Daemon (examples/daemon_bench.rs, warm cache)\n")
        w("Per arrival once the window is full: `update` reads the new and the evicted checkpoint and")
        w("updates SMA, WMA (2 sums) and EMA in one pass; its floor reads the same bytes once plus one")
        w("read-modify-write pass over the accumulators. `emit` publishes the SMA; its floor writes and")
        w("fsyncs the same bytes. Medians over the arrivals of one run.\n")
        w("| size | window | update (s) | update floor (s) | ratio | emit (s) | write floor (s) | ratio | accumulators |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in daemon:
            u, uf, e, ef = (float(r[k]) for k in ("update_s", "update_floor_s", "emit_s", "emit_floor_s"))
            w(f"| {r['size']} | {r['window']} | {u:.3f} | {uf:.3f} | {u / uf:.2f}x | {e:.3f} | {ef:.3f} | {e / ef:.2f}x | {r['acc']} |")
        w("")
    # Targets, on the largest size measured (warm cache).
    big = sizes[-1] if sizes else None
    if big:
        w(f"## Targets (largest size measured: {big}, warm cache)\n")
        w("| target | measured | met |")
        w("|---|---|---|")
        fl = best_floor(med, big, "warm")
        pm, mk = (med.get((big, "warm", t)) for t in ("pmad", "mergekit"))
        dense = []  # the same targets, as upper bounds, for the plot: (case, measured, goal)
        if fl and pm:
            r = pm["wall"] / fl["wall"]
            w(f"| pmad merge <= 1.3x the I/O floor | {r:.2f}x | {'yes' if r <= 1.3 else 'NO'} |")
            dense.append((f"pmad merge {big}, ratio to floor", r, 1.3))
        if mk and pm:
            r = mk["wall"] / pm["wall"]
            w(f"| pmad >= 6x faster than mergekit | {r:.2f}x | {'yes' if r >= 6 else 'NO'} |")
            dense.append((f"pmad time / mergekit time, {big}", 1 / r, 1 / 6))
        rss = [m["rss"] for (s, c, t), m in med.items() if t == "pmad"]
        if rss:
            w(f"| pmad peak RSS < 200 MB at every size | max {max(rss):.0f} MB | {'yes' if max(rss) < 200 else 'NO'} |")
            dense.append(("pmad merge peak RSS, every size", max(rss), 200))
        dr = [r for r in daemon if r["size"] == big]
        if dr:
            r = float(dr[0]["update_s"]) / float(dr[0]["update_floor_s"])
            w(f"| daemon per-arrival update <= 1.5x its floor | {r:.2f}x | {'yes' if r <= 1.5 else 'NO'} |")
            dense.append((f"daemon per-arrival update {big}, ratio to floor", r, 1.5))
        w("")
        targets = [
            {"section": "dense", "case": c, "measured": f"{m:.3f}", "goal": f"{g:.3f}", "unit": ""}
            for c, m, g in dense
        ] + targets
    if targets:
        w("## Every target, this run\n")
        w("| section | case | measured | goal | met |")
        w("|---|---|---:|---:|---|")
        for t in targets:
            unit = t["unit"]
            goal = f"<= {t['goal']} {unit}" if t["goal"] else "(reported)"
            w(f"| {t['section']} | {t['case']} | {t['measured']} {unit} | {goal} | {met(t['measured'], t['goal'], unit)} |")
        w("")
    for name, title in SECTIONS:
        f = os.path.join(d, f"{name}.txt")
        if os.path.exists(f) and os.path.getsize(f):
            w(f"## {title}\n")
            w("```text\n" + open(f).read().rstrip() + "\n```\n")
    chk = os.path.join(d, "checks.txt")
    if os.path.exists(chk) and os.path.getsize(chk):
        w("## Agreement of the outputs (bench/peers/compare.py, reference = pmad)\n")
        w("```text\n" + open(chk).read().rstrip() + "\n```\n")
    open(os.path.join(d, "results.md"), "w").write("\n".join(out) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not available, no plot", file=sys.stderr)
        return
    wrote = ["results.md"]
    if sizes:  # no dense section measured (--sections without dense): no time-vs-size plot
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [size_bytes(s) / 1e6 for s in sizes]
        color = {"floor": "tab:blue", "floor1": "tab:cyan", "pmad": "tab:green", "mergekit": "tab:red", "torch": "tab:purple"}
        for c, style in (("warm", "-o"), ("cold", "--s")):
            for t in TOOLS:
                ys = [med[s, c, t]["wall"] if (s, c, t) in med else None for s in sizes]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color[t], label=f"{t} ({c})")
        k = "K"
        if os.path.exists(meta):
            for tok in open(meta).read().split():
                if tok.startswith("K="):
                    k = tok[2:]
        ax.set_xlabel(f"checkpoint size (MB of tensor data); {k} checkpoints merged")
        ax.set_ylabel("wall time, median (s)")
        ax.set_yscale("log")
        ax.set_title("Merging K checkpoints: time vs checkpoint size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "merge_time.png"), dpi=120)
        plt.close(fig)
        wrote.append("merge_time.png")
    goals = [t for t in targets if t["goal"] and t["measured"]]

    def number(v):
        try:
            return float(v)
        except ValueError:
            return None

    # Targets reported without a goal (the peers' ratios, CPU per GB): as measured, own panel.
    reported = [t for t in targets if not t["goal"] and number(t["measured"]) is not None]
    if goals or reported:
        rows = [len(goals), len(reported)]
        fig, axes = plt.subplots(
            sum(1 for r in rows if r), 1, squeeze=False,
            figsize=(8, 0.45 * sum(rows) + 1.2 + (1.0 if all(rows) else 0)),
            gridspec_kw={"height_ratios": [r for r in rows if r]},
        )
        axes = list(axes[:, 0])
        if goals:
            # Every target with a goal as measured / goal: below the line is met.
            ax = axes.pop(0)
            labels = [f"{t['section']}: {t['case']}" for t in goals]
            vals = [max(float(t["measured"]), 0.0) / float(t["goal"]) for t in goals]
            cols = ["tab:green" if v <= 1 else "tab:red" for v in vals]
            ax.barh(range(len(goals)), vals, color=cols)
            ax.axvline(1.0, color="black", lw=1)
            ax.set_yticks(range(len(goals)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("measured / goal (1 = the goal; left of the line is met)")
            ax.set_title("Performance targets, one run")
        if reported:
            ax = axes.pop(0)
            labels = [f"{t['section']}: {t['case']}" for t in reported]
            raw = [number(t["measured"]) for t in reported]
            pos = [v for v in raw if v > 0] or [1.0]
            # Whole decades, with room on the right for the labels; values <= 0 (a negative
            # slowdown) get no bar, only their label at the left edge.
            lo = 10 ** math.floor(math.log10(min(pos)))
            vals = [v if v > 0 else lo for v in raw]
            ax.barh(range(len(reported)), vals, color="tab:gray")
            for i, t in enumerate(reported):
                ax.text(vals[i], i, f" {t['measured']} {t['unit']}", va="center", fontsize=7)
            ax.set_xscale("log")
            ax.set_xlim(lo, 10 ** math.ceil(math.log10(max(pos) * 4)))
            ax.set_yticks(range(len(reported)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("as measured, in each row's unit (log scale); no goal")
            ax.set_title("Reported without a goal", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(d, "targets.png"), dpi=120)
        wrote.append("targets.png")
    print(f"report.py: wrote {', '.join(wrote)} in {d}", file=sys.stderr)


if __name__ == "__main__":
    main()
