"""Validation loss of the newest DCP checkpoint vs each pmad merged output, as Markdown.

Every model is loaded the way torchtitan loads a checkpoint: a freshly built model's state
dict, filled in place by `torch.distributed.checkpoint.load`. The merged outputs are used
exactly as a downstream user (or a resumed run) would use them. The validation text is
held-out stdlib files (data.py), scored in nats per byte (file-boundary tokens not scored).

    python eval.py                       # newest checkpoint, each recipe's LATEST output
    python eval.py --step 700            # checkpoint step-700 vs every recipe's step-700 output
    python eval.py --verify              # also recompute each merge in float64 (see below)
    python eval.py --also-checkpoints 3  # also score the 3 checkpoints before the compared one

--verify loads every input that the output's merge.json names (`inputs`, `weights`) with
dcp.load and recomputes sum_i w_i * x_i in float64 for every model tensor; each of pmad's
float32 values must be within 1e-6 of it, relative or absolute (|got - want| <= 1e-6 *
max(1, |want|)). Every other key (optimizer.*, lr_scheduler.*, dataloader.*, train_state.*)
must equal the newest input's exactly (tensors bit for bit), and the output's .metadata must
list the same keys as the newest input's.

A running EMA names every checkpoint since the start of the phase, and train.py --keep has
deleted most of them. Then the EMA is checked as the recurrence it is: the output at step N
must be w * x_N + (1 - w) * (pmad's previous output), w being the newest input's weight, with
the previous output's weights consistent with it; this is repeated back through the outputs
the recipe keeps for as long as their newest inputs exist. (The previous output is float32,
so the recurrence carries its rounding, well below the 1e-6 tolerance.)
"""

import argparse
import json
import os
import re
import sys
import time

import torch

import data
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-6


def checkpoints(ckpt_dir):
    out = {}
    for name in os.listdir(ckpt_dir):
        m = re.fullmatch(r"step-(\d+)", name)
        if m and os.path.exists(os.path.join(ckpt_dir, name, ".metadata")):
            out[int(m.group(1))] = os.path.join(ckpt_dir, name)
    return out


def score(path, model_args, val_tokens, args):
    model = M.load_model(path, M.build(model_args))
    return data.val_loss(model, M.loss_fn, val_tokens, args.block_size, args.max_blocks, args.batch_size)


def model_keys(model_args):
    return set(M.build(model_args).state_dict())


def compare_averaged(got, want, keys):
    """Largest |got - want| / max(1, |want|) over the averaged tensors."""
    worst = 0.0
    for k in keys:
        g = got[k]
        if g.dtype != torch.float32:
            raise AssertionError(f"{k}: published as {g.dtype}, the inputs are float32")
        err = ((g.double() - want[k]).abs() / want[k].abs().clamp_min(1.0)).max().item()
        worst = max(worst, err)
    return worst


def compare_copied(out_dir, got, newest_dir, newest, averaged):
    """The keys that are not weights must equal the newest input's; the key sets must match."""
    if M.saved_keys(out_dir) != M.saved_keys(newest_dir):
        diff = sorted(M.saved_keys(out_dir) ^ M.saved_keys(newest_dir))
        raise AssertionError(f"{out_dir}: .metadata keys differ from the newest input's: {diff[:5]}")
    n = 0
    for k, v in got.items():
        if k in averaged:
            continue
        w = newest[k]
        if isinstance(v, torch.Tensor):
            same = v.dtype == w.dtype and v.shape == w.shape and torch.equal(v.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
        else:
            same = type(v) is type(w) and v == w
        if not same:
            raise AssertionError(f"{k}: differs from the newest input {newest_dir}")
        n += 1
    return n


def verify(out_dir, rec, model_args, recipe_dir):
    """Returns a dict: ok (True, False, or None when the inputs needed are gone), and mode,
    max_err, copied (number of keys) or a note."""
    averaged = model_keys(model_args)
    got = M.load_everything(out_dir, model_args)
    newest_dir = rec["inputs"][-1]
    if not os.path.isdir(newest_dir):
        return {"ok": None, "note": f"not checked: the newest input {newest_dir} was deleted"}
    newest = M.load_everything(newest_dir, model_args)
    copied = compare_copied(out_dir, got, newest_dir, newest, averaged)
    present = [os.path.isdir(p) for p in rec["inputs"]]
    if all(present):
        want = None
        for w, path in zip(rec["weights"], rec["inputs"]):
            x = newest if path == newest_dir else M.load_everything(path, model_args)
            if want is None:
                want = {k: x[k].double() * w for k in averaged}
            else:
                for k in averaged:
                    want[k] += x[k].double() * w
        err = compare_averaged(got, want, averaged)
        return {"ok": err <= TOL, "mode": f"all {len(rec['inputs'])} inputs", "max_err": err, "copied": copied}
    if rec["method"] != "ema":
        return {"ok": None, "note": f"not checked: {present.count(False)} of {len(present)} inputs deleted"}
    # The EMA recurrence, back through the kept outputs.
    links, worst = 0, 0.0
    cur_dir, cur_rec, cur = out_dir, rec, got
    while True:
        prev_dir = os.path.join(recipe_dir, f"step-{cur_rec['steps'][-2]}") if len(cur_rec["steps"]) > 1 else None
        if not prev_dir or not os.path.isdir(prev_dir) or not os.path.isdir(cur_rec["inputs"][-1]):
            break
        with open(os.path.join(prev_dir, "merge.json")) as fh:
            prev_rec = json.load(fh)
        w = cur_rec["weights"][-1]
        if prev_rec["steps"] != cur_rec["steps"][:-1] or any(
            abs(a - (1 - w) * b) > 1e-12 for a, b in zip(cur_rec["weights"][:-1], prev_rec["weights"])
        ):
            return {"ok": False, "note": f"{cur_dir}: merge.json is not (1 - {w}) x {prev_dir}'s plus the newest input"}
        x = newest if cur_rec["inputs"][-1] == newest_dir else M.load_everything(cur_rec["inputs"][-1], model_args)
        prev = M.load_everything(prev_dir, model_args)
        want = {k: w * x[k].double() + (1 - w) * prev[k].double() for k in averaged}
        worst = max(worst, compare_averaged(cur, want, averaged))
        links += 1
        cur_dir, cur_rec, cur = prev_dir, prev_rec, prev
    if links == 0:
        return {"ok": None, "note": "not checked: inputs deleted and no previous output kept"}
    return {"ok": worst <= TOL, "mode": f"EMA recurrence over {links} output{'s' if links > 1 else ''}", "max_err": worst, "copied": copied}


def describe_steps(steps):
    steps = [s for s in steps if s is not None]
    if not steps:
        return "?"
    if len(steps) <= 3:
        return ",".join(map(str, steps))
    return f"{steps[0]}..{steps[-1]}"


def recipe_order(d):
    order = {"sma": 0, "wma": 1, "ema": 2}
    return (order.get(d[:3], 3), [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", d)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(HERE, "run", "output"), help="train.py's --output-dir")
    p.add_argument("--merged-dir", default=os.path.join(HERE, "run", "merged"), help="parent of the recipes' out_dirs")
    p.add_argument("--step", type=int, default=0, help="compare at this step (0 = newest checkpoint, each recipe's LATEST)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=0, help="score at most this many validation blocks (0 = all)")
    p.add_argument("--verify", action="store_true", help="recompute each merge in float64 and check the copied keys")
    p.add_argument("--also-checkpoints", type=int, default=0, metavar="K",
                   help="also score the K checkpoints before the compared one (how noisy is a single checkpoint?)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is the fastest for this model)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with open(os.path.join(args.output_dir, "model_args.json")) as fh:
        model_args = json.load(fh)
    _, val_tokens, info = data.load_split()
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    ckpts = checkpoints(ckpt_dir)
    if not ckpts:
        sys.exit(f"no step-<N>/ with .metadata under {ckpt_dir}")
    step = args.step or max(ckpts)
    if step not in ckpts:
        sys.exit(f"no step-{step} under {ckpt_dir} (train.py --keep deletes older ones)")

    t0 = time.time()
    rows = []
    loss, scored = score(ckpts[step], model_args, val_tokens, args)
    rows.append({"model": f"{'checkpoint' if args.step else 'latest checkpoint'} (step {step})", "inputs": str(step), "n": 1,
                 "path": ckpts[step], "loss": loss})
    earlier = sorted(x for x in ckpts if x < step)[-args.also_checkpoints:] if args.also_checkpoints else []
    for cs in earlier:
        loss, _ = score(ckpts[cs], model_args, val_tokens, args)
        rows.append({"model": f"checkpoint {cs}", "inputs": str(cs), "n": 1, "path": ckpts[cs], "loss": loss})

    recipes = []
    if os.path.isdir(args.merged_dir):
        recipes = sorted((d for d in os.listdir(args.merged_dir) if os.path.isdir(os.path.join(args.merged_dir, d))), key=recipe_order)
    failed = unchecked = 0
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
        loss, _ = score(mdir, model_args, val_tokens, args)
        row = {"model": f"pmad `{r}` ({method}) {name}", "inputs": describe_steps(rec["steps"]), "n": len(rec["steps"]),
               "path": mdir, "loss": loss, "oldest_weight": rec["weights"][0], "newest_weight": rec["weights"][-1]}
        if args.verify:
            try:
                row["verify"] = verify(mdir, rec, model_args, rdir)
            except AssertionError as e:
                row["verify"] = {"ok": False, "note": str(e)}
            failed += row["verify"]["ok"] is False
            unchecked += row["verify"]["ok"] is None
        rows.append(row)

    base = rows[0]["loss"]
    print()
    print(f"Validation: {info['val_files']} held-out stdlib files, {scored} bytes scored; block {args.block_size}.")
    print()
    hdr, sep = "| model | checkpoints averaged | n | val loss (nats/byte) | vs latest |", "|---|---|---|---|---|"
    if args.verify:
        hdr += " --verify: max err vs f64 | copied keys equal newest |"
        sep += "---|---|"
    print(hdr)
    print(sep)
    for r in rows:
        delta = "" if r is rows[0] else f"{r['loss'] - base:+.4f}"
        line = f"| {r['model']} | {r['inputs']} | {r['n']} | {r['loss']:.4f} | {delta} |"
        if args.verify:
            v = r.get("verify")
            if v is None:
                line += " | |"
            elif "max_err" in v:
                line += f" {'ok' if v['ok'] else 'FAIL'} {v['max_err']:.1e} ({v['mode']}) | {v['copied']} keys |"
            else:
                line += f" {'FAIL: ' if v['ok'] is False else ''}{v['note']} | |"
        print(line)
    print()
    print(f"(all {len(rows)} model(s) loaded with torch.distributed.checkpoint.load; eval took {time.time() - t0:.0f}s)")
    if args.verify:
        checked = sum(1 for r in rows if r.get("verify")) - unchecked
        print(f"verify: {'ok' if not failed else 'FAILED'}: {checked - failed} output(s) passed, {failed} failed"
              + (f", {unchecked} not checkable (inputs deleted by train.py --keep)" if unchecked else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"step": step, "rows": rows, "scored_bytes": scored, "verify_failed": failed if args.verify else None,
                       "verify_unchecked": unchecked if args.verify else None}, fh, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
