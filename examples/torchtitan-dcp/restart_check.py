"""Did a run resumed from a pmad output continue from the merged model (PMA-init)?

run.sh resumes training twice for the same few steps with `train.py --resume-from`: from the
best recipe's output and, as the control, from the newest checkpoint itself. Both see the same
batches (the data position comes from the checkpoint; a pmad output copies it from its newest
input). This reads their logs and the original run's, prints a Markdown table and checks:

1. step: the resumed run's first step is the original run's last step + 1 (train_state.step
   was restored) and it trains at the original run's LR (lr_scheduler state restored);
2. weights: the validation loss train.py measured right after loading the pmad output through
   its resume path equals eval.py's loss for that output (within 1e-4): the model that
   resumed training is the merged one;
3. loss: the resumed run's first step scores the loaded weights on the next batch before any
   update. Its loss must differ from the control's (the checkpoint on the same batch) by what
   eval.py measured between the merged model and the checkpoint on the validation set, within
   0.05 nats/byte, and be far below a fresh model's (the original run's first step): training
   continued from the merged model, not from scratch.

The table also shows where the two resumed runs stand after --first steps and at the end: at
the constant LR, the averaged weights' advantage fades as training goes on.

    python restart_check.py --original run/output --merged run/resume/sma8 --latest run/resume/latest \
        --results run/results.json
Exits 1 if a check fails.
"""

import argparse
import json
import os
import sys


def read_metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_summary(d):
    with open(os.path.join(d, "train_summary.json")) as fh:
        return json.load(fh)


def fmt6(x):
    return "?" if x is None else f"{x:.6f}"


def mean(xs):
    return sum(xs) / len(xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, help="the original run's train.py --output-dir")
    p.add_argument("--merged", required=True, help="output dir of the run resumed from the pmad output")
    p.add_argument("--latest", required=True, help="output dir of the run resumed from the newest checkpoint (control)")
    p.add_argument("--results", required=True, help="eval.py --json output (the merged output's validation loss)")
    p.add_argument("--first", type=int, default=10, help="steps averaged for the table's training-loss columns")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    k = args.first

    orig = read_metrics(args.original)
    last_step = orig[-1]["step"]
    orig_last = mean([m["loss"] for m in orig[-k:]])
    scratch = orig[0]["loss"]
    with open(args.results) as fh:
        eval_rows = {os.path.realpath(r["path"]): r["loss"] for r in json.load(fh)["rows"]}

    runs = [("pmad output (PMA-init)", args.merged), ("newest checkpoint (control)", args.latest)]
    table = []
    for label, d in runs:
        s = read_summary(d)["resumed"]
        m = read_metrics(d)
        table.append({
            "label": label,
            "from": s["from"],
            "first_step": m[0]["step"],
            "last_step": m[-1]["step"],
            "lr": m[0]["lr"],
            "val_before": s.get("val_loss_before"),
            "val_eval": eval_rows.get(os.path.realpath(s["from"])),
            "train_step1": m[0]["loss"],
            "train_first": mean([x["loss"] for x in m[:k]]),
            "train_last": mean([x["loss"] for x in m[-k:]]),
            "val_after": s.get("val_loss_after"),
        })

    def f(x):
        return "" if x is None else f"{x:.4f}"

    print()
    print(f"| training run | resumed from | steps | val loss at start | train loss, first step | mean train loss, first {k} steps "
          f"| mean train loss, last {k} steps | val loss at the end |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| original run | (random init) | 1..{last_step} | | {scratch:.4f} | "
          f"{mean([x['loss'] for x in orig[:k]]):.4f} | {orig_last:.4f} | {f(table[1]['val_eval'])} |")
    for r in table:
        print(f"| resumed: {r['label']} | `{r['from']}` | {r['first_step']}..{r['last_step']} | {f(r['val_before'])} | "
              f"{r['train_step1']:.4f} | {r['train_first']:.4f} | {r['train_last']:.4f} | {f(r['val_after'])} |")
    print()

    m, c = table
    d_train = m["train_step1"] - c["train_step1"]
    d_val = None if m["val_eval"] is None or c["val_eval"] is None else m["val_eval"] - c["val_eval"]
    checks = [
        (f"step: resumed at step {m['first_step']} (original ended at {last_step}), LR {m['lr']:.2e} (original {orig[-1]['lr']:.2e})",
         m["first_step"] == last_step + 1 and abs(m["lr"] - orig[-1]["lr"]) <= 1e-12),
        (f"weights: val loss right after loading {fmt6(m['val_before'])}, eval.py's for the same output {fmt6(m['val_eval'])}",
         m["val_before"] is not None and m["val_eval"] is not None and abs(m["val_before"] - m["val_eval"]) <= 1e-4),
        (f"loss: first resumed step {m['train_step1']:.4f}, {d_train:+.4f} from the control's on the same batch; eval.py "
         f"measured {'?' if d_val is None else f'{d_val:+.4f}'} between the two models; a fresh model's first step: {scratch:.4f}",
         d_val is not None and abs(d_train - d_val) <= 0.05 and m["train_step1"] < scratch - 1.0),
    ]
    for text, ok in checks:
        print(f"restart check {'ok  ' if ok else 'FAIL'}: {text}")
    passed = all(ok for _, ok in checks)
    print(f"restart check: {'passed' if passed else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": table, "original_last": orig_last, "scratch_first_step": scratch,
                       "checks": [{"check": t, "ok": ok} for t, ok in checks], "passed": passed}, fh, indent=2)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
