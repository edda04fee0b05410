"""Validation loss of the latest Trainer checkpoint vs each pmad merged output, as Markdown.

Every model is loaded with `AutoModelForCausalLM.from_pretrained(dir)`: the merged outputs are
used exactly as a downstream user would. The validation text is held-out stdlib files (data.py),
scored in nats per byte (file-boundary tokens are not scored).

    python eval.py                       # newest checkpoint, each recipe's LATEST output
    python eval.py --step 1000           # checkpoint-1000 vs every recipe's step-1000 output
    python eval.py --verify              # also recompute each merge in float64 from merge.json
    python eval.py --also-checkpoints 3  # also score the 3 checkpoints before the newest
    python eval.py --extra "REAL decay=run/decay/fork-linear/checkpoint-2000"   # see decay.sh

Also reported per merged output: the steps it averages (from merge.json) and, with --verify,
the largest relative difference between pmad's tensors and a float64 recomputation from the
checkpoint files it names.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

import data

HERE = os.path.dirname(os.path.abspath(__file__))


def val_loss(model_dir, val_tokens, block_size, batch_size, max_blocks):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ds = data.BlockDataset(val_tokens, block_size, max_blocks or None)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(b, min(b + batch_size, len(ds)))]
            x = torch.stack([it["input_ids"] for it in items])
            y = torch.stack([it["labels"] for it in items])
            logits = model(input_ids=x).logits[:, :-1].float()
            tgt = y[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += nll.item()
            count += int((tgt != -100).sum())
    return total / count, count


def checkpoints(output_dir):
    out = {}
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.exists(os.path.join(output_dir, name, "trainer_state.json")):
            out[int(m.group(1))] = os.path.join(output_dir, name)
    return out


def verify(merged_dir, record):
    """Recompute sum_i w_i * x_i in float64 from the inputs named in merge.json."""
    from safetensors import safe_open

    def load(d):
        f = os.path.join(d, "model.safetensors")
        with safe_open(f, "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}

    got = load(merged_dir)
    acc = None
    for w, path in zip(record["weights"], record["inputs"]):
        if not os.path.isdir(path):
            return None
        t = load(path)
        if acc is None:
            acc = {k: v.double() * w for k, v in t.items()}
        else:
            for k, v in t.items():
                acc[k] += v.double() * w
    worst = 0.0
    for k, ref in acc.items():
        g = got[k].double()
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (g - ref).abs().max().item() / scale)
    return worst


def describe_steps(steps):
    steps = [s for s in steps if s is not None]
    if not steps:
        return "?"
    if len(steps) <= 3:
        return ",".join(map(str, steps))
    return f"{steps[0]}..{steps[-1]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(HERE, "run", "output"), help="the Trainer's output_dir")
    p.add_argument("--merged-dir", default=os.path.join(HERE, "run", "merged"), help="parent of the recipes' out_dirs")
    p.add_argument("--step", type=int, default=0, help="compare at this step (0 = newest checkpoint, each recipe's LATEST)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=0, help="score at most this many validation blocks (0 = all)")
    p.add_argument("--verify", action="store_true", help="recompute each merge in float64 and report the max relative error")
    p.add_argument("--also-checkpoints", type=int, default=0, metavar="K",
                   help="also score the K checkpoints before the compared one (how noisy is a single checkpoint?)")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR",
                   help="also score this model directory (e.g. a real LR-decay fork); adds a column with every "
                        "model's share of its gain over the compared checkpoint (repeatable)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per model
    _, val_tokens, info = data.load_split()
    ckpts = checkpoints(args.output_dir)
    if not ckpts:
        sys.exit(f"no checkpoint-<step>/ with trainer_state.json under {args.output_dir}")
    step = args.step or max(ckpts)
    if step not in ckpts:
        sys.exit(f"no checkpoint-{step} under {args.output_dir}")

    rows = []  # (label, steps, n, path, loss)
    t0 = time.time()
    loss, scored = val_loss(ckpts[step], val_tokens, args.block_size, args.batch_size, args.max_blocks)
    rows.append({"model": f"{'checkpoint' if args.step else 'latest checkpoint'} (step {step})", "inputs": str(step), "n": 1, "path": ckpts[step], "loss": loss})

    earlier = sorted(x for x in ckpts if x < step)[-args.also_checkpoints:] if args.also_checkpoints else []
    for cs in earlier:
        loss, _ = val_loss(ckpts[cs], val_tokens, args.block_size, args.batch_size, args.max_blocks)
        rows.append({"model": f"checkpoint {cs}", "inputs": str(cs), "n": 1, "path": ckpts[cs], "loss": loss})

    recipes = []
    if os.path.isdir(args.merged_dir):
        recipes = [d for d in os.listdir(args.merged_dir) if os.path.isdir(os.path.join(args.merged_dir, d))]
    # sma, then wma, then ema; smaller windows first (sma4 before sma8)
    order = {"sma": 0, "wma": 1, "ema": 2}
    recipes.sort(key=lambda d: (order.get(d[:3], 3), [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", d)]))
    for r in recipes:
        rdir = os.path.join(args.merged_dir, r)
        if args.step:
            name = f"step-{args.step}"
        else:
            try:
                with open(os.path.join(rdir, "LATEST")) as fh:
                    name = fh.read().strip()
            except FileNotFoundError:
                print(f"warning: {rdir} has no LATEST: nothing published", file=sys.stderr)
                continue
        mdir = os.path.join(rdir, name)
        if not os.path.isdir(mdir):
            print(f"warning: {mdir} does not exist", file=sys.stderr)
            continue
        with open(os.path.join(mdir, "merge.json")) as fh:
            rec = json.load(fh)
        method = rec["method"] + (f" alpha={rec['alpha']:g}" if rec.get("alpha") else "")
        loss, _ = val_loss(mdir, val_tokens, args.block_size, args.batch_size, args.max_blocks)
        row = {
            "model": f"pmad `{r}` ({method}) {name}",
            "inputs": describe_steps(rec["steps"]),
            "n": len(rec["steps"]),
            "path": mdir,
            "loss": loss,
            "oldest_weight": rec["weights"][0] if rec["weights"] else None,
            "newest_weight": rec["weights"][-1] if rec["weights"] else None,
        }
        if args.verify:
            row["max_rel_err"] = verify(mdir, rec)
        rows.append(row)

    extras = []
    for spec in args.extra:
        label, sep, path = spec.partition("=")
        if not sep or not os.path.isdir(path):
            sys.exit(f"--extra {spec!r}: want LABEL=DIR with an existing DIR")
        loss, _ = val_loss(path, val_tokens, args.block_size, args.batch_size, args.max_blocks)
        row = {"model": label, "inputs": "", "n": 1, "path": path, "loss": loss}
        rows.append(row)
        extras.append(row)

    base = rows[0]["loss"]
    print()
    print(f"Validation: {info['val_files']} held-out stdlib files, {scored} bytes scored; block {args.block_size}.")
    print()
    hdr = "| model | checkpoints averaged | n | val loss (nats/byte) | vs latest |"
    sep = "|---|---|---|---|---|"
    if args.verify:
        hdr += " max rel. err vs f64 recompute |"
        sep += "---|"
    for x in extras:
        hdr += f" % of {x['model']}'s gain |"
        sep += "---|"
    print(hdr)
    print(sep)
    for r in rows:
        delta = "" if r is rows[0] else f"{r['loss'] - base:+.4f}"
        line = f"| {r['model']} | {r['inputs']} | {r['n']} | {r['loss']:.4f} | {delta} |"
        if args.verify:
            e = r.get("max_rel_err")
            line += " " + ("" if "max_rel_err" not in r else ("inputs gone" if e is None else f"{e:.1e}")) + " |"
        for x in extras:
            gain = base - x["loss"]
            share = "" if r is rows[0] or gain == 0 else f"{100 * (base - r['loss']) / gain:.0f}%"
            r.setdefault("share_of_gain", {})[x["model"]] = share
            line += f" {share} |"
        print(line)
    print()
    print(f"(all {len(rows)} model(s) loaded with AutoModelForCausalLM.from_pretrained; eval took {time.time() - t0:.0f}s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"step": step, "rows": rows, "scored_bytes": scored}, fh, indent=2)


if __name__ == "__main__":
    main()
