#!/usr/bin/env python3
"""Render panels of pmad.json from real data with matplotlib: an approximation of the Grafana
dashboard for the docs (docs/img/dashboard-rendering.png), not a Grafana screenshot.

It runs a short live setup in a temp dir: `pmad run` watching deploy/compose/fake_trainer.py
(a stand-in HF Trainer saving every few seconds) and a Prometheus (Debian package
`prometheus`) scraping pmad every second. Then it evaluates each rendered panel's own queries
from pmad.json over the run with /api/v1/query_range, dashboard variables set to "all".

    python3 deploy/grafana/render_panels.py --pmad target/release/pmad --seconds 150 \
        --out docs/img/dashboard-rendering.png      # needs matplotlib
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PANELS = [
    "Newest emitted step vs newest checkpoint",
    "Steps behind the newest checkpoint",
    "Lag",
    "Emission duration",
    "Throughput",
    "Checkpoints",
    "Free space on output filesystems",
    "Memory",
    "CPU",
]
UNITS = {"s": "seconds", "bytes": "bytes", "Bps": "bytes/s", "short": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def wait_http(url: str, limit: float = 60) -> None:
    end = time.time() + limit
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer within {limit} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pmad", type=Path, default=REPO / "target/release/pmad")
    ap.add_argument("--prometheus", default="prometheus")
    ap.add_argument("--seconds", type=int, default=150, help="length of the live run")
    ap.add_argument("--out", type=Path, default=REPO / "docs/img/dashboard-rendering.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads((HERE / "pmad.json").read_text())
    panels = {p["title"]: p for p in dash["panels"] if p.get("type") == "timeseries"}
    with tempfile.TemporaryDirectory(prefix="pmad-render-") as tmp:
        tmp = Path(tmp)
        (tmp / "ckpt").mkdir()
        pmad_port, prom_port = free_port(), free_port()
        (tmp / "pmad.toml").write_text(f"""
[watch]
dir = "{tmp}/ckpt"
poll_interval = "1s"
settle = "1s"
[phase]
lr_from_trainer_state = true
[[recipe]]
name = "sma5"
method = "sma"
window = 5
out_dir = "{tmp}/out/sma5"
[[recipe]]
name = "ema"
method = "ema"
alpha = 0.3
emit_every = 3
out_dir = "{tmp}/out/ema"
[server]
listen = "127.0.0.1:{pmad_port}"
""")
        (tmp / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: pmad
    static_configs: [{{targets: ["127.0.0.1:{pmad_port}"]}}]
""")
        log = open(tmp / "run.log", "w")
        procs = [
            subprocess.Popen([str(args.pmad), "run", "--config", str(tmp / "pmad.toml")], stdout=log, stderr=log),
            subprocess.Popen([args.prometheus, f"--config.file={tmp}/prometheus.yml",
                              f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"],
                             stdout=log, stderr=log),
        ]
        try:
            wait_http(f"http://127.0.0.1:{pmad_port}/readyz")
            wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
            start = time.time()
            trainer = subprocess.Popen([sys.executable, "-B", str(REPO / "deploy/compose/fake_trainer.py"),
                                        "--out", str(tmp / "ckpt"), "--interval", "3", "--warmup-steps", "200",
                                        "--hidden", "256", "--layers", "4"], stdout=log, stderr=log)
            procs.append(trainer)
            time.sleep(args.seconds)
            end = time.time()
            time.sleep(2)
            fig, axes = plt.subplots(3, 3, figsize=(18, 11))
            for ax, title in zip(axes.flat, PANELS):
                p = panels[title]
                for t in p["targets"]:
                    q = t["expr"].replace("$__rate_interval", "10s").replace("$__range", "5m")
                    q = re.sub(r'(\w+)=~"\$\w+"', r'\1=~".+"', q)
                    url = f"http://127.0.0.1:{prom_port}/api/v1/query_range?" + urllib.parse.urlencode(
                        {"query": q, "start": start, "end": end, "step": 2})
                    for s in get_json(url)["data"]["result"]:
                        legend = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: s["metric"].get(m.group(1), ""),
                                        t.get("legendFormat", ""))
                        xs = [float(v[0]) - start for v in s["values"]]
                        ys = [float(v[1]) for v in s["values"]]
                        ax.plot(xs, ys, label=legend or q[:40])
                ax.set_title(title, fontsize=11)
                ax.set_xlabel("seconds into the run", fontsize=8)
                ax.set_ylabel(UNITS.get(p["fieldConfig"]["defaults"].get("unit", "short"), ""), fontsize=8)
                ax.tick_params(labelsize=8)
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7, loc="best")
            fig.suptitle("pmad dashboard panels (deploy/grafana/pmad.json), rendered with matplotlib from a "
                         f"real {args.seconds} s run scraped by Prometheus - not a Grafana screenshot", fontsize=12)
            fig.tight_layout()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.out, dpi=80)
            print(f"wrote {args.out}")
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
