#!/usr/bin/env python3
"""Generate synthetic torchtitan-style DCP checkpoints for bench/dcp.sh (needs torch).

    python bench/peers/gen_dcp.py --dir /tmp/pmad-bench-dcp --count 8 --size 500MB [--dtype f32|bf16]
                                  [--optimizer] [--seed 1] [--noise 1e-3]

Writes `<dir>/step-1000`, `step-2000`, ... the way torchtitan saves a one-rank run:
`torch.distributed.checkpoint.save(state_dict, checkpoint_id=..., no_dist=True)` (one
`__0_0.distcp` data file and `.metadata`), with torchtitan's state-dict layout:

- the model at the top level, Llama-shaped with torchtitan's names: `tok_embeddings.weight`,
  per layer `attention.{wq,wk,wv,wo}.weight`, `feed_forward.{w1,w2,w3}.weight`,
  `attention_norm.weight`, `ffn_norm.weight`, then `norm.weight` and `output.weight`. Its
  tensors total SIZE bytes (to within a few KB) in `--dtype` (default f32, torchtitan's
  default): hidden size, layer count and intermediate size follow Llama's proportions (the
  same rule as examples/gen_ckpts.rs), the vocabulary absorbs the remainder. These are the
  tensors a merge averages;
- small training-state entries, copied (not averaged) by a merge: `train_state` {"step": N},
  `lr_scheduler` {"last_epoch": N}, `dataloader` {"state": <pickled bytes whose length
  changes with N>} (so item offsets move between checkpoints, as in real runs);
- with `--optimizer`, AdamW's `optimizer.state.<param>.{exp_avg,exp_avg_sq,step}` (moments in
  the parameter dtype) and `optimizer.param_groups`: the size of a resumable checkpoint (3 x
  SIZE). Off by default.

Checkpoint i holds `base + noise_i`: a base shared by all (|w| ~ 0.02, norms ~ 1) plus
per-checkpoint noise (`--noise`), like consecutive checkpoints of one run. Every value is a
function of (seed, tensor, checkpoint) only: the same arguments write the same tensors (the
`.metadata` pickles differ in torch's random `save_id`).

A checkpoint is written to `step-N.tmp-gen` and renamed into place. `<dir>/step-N.json`
(beside the checkpoint, so the checkpoint directory holds only what torch wrote) records the
arguments and the file sizes; a checkpoint whose record matches the request and whose files
still have those sizes is reused, not rewritten. Prints the checkpoint paths, oldest first,
one per line on stdout; progress goes to stderr.
"""
import argparse
import importlib.metadata
import json
import os
import pickle
import shutil
import sys
import time
import warnings

# torch is imported only when a checkpoint has to be written (the import takes seconds).
torch = dcp = None

# Bumped whenever the generated values or layout change for the same arguments.
FORMAT_VERSION = 1
ELEM_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(s):
    u = s.strip().upper()
    for k in sorted(UNITS, key=len, reverse=True):
        if u.endswith(k):
            return int(float(u[: -len(k)]) * UNITS[k])
    return int(u)


def llama_shape(params):
    """(hidden, intermediate, layers, vocab) for about `params` parameters: as gen_ckpts.rs."""
    hs = [8192, 6144, 5120, 4096, 3072, 2560, 2048, 1536, 1024, 768, 512, 384, 256, 128, 64, 32, 16]

    def inter(h):
        m = min(max(h // 4, 1), 256)
        return -(-(8 * h // 3) // m) * m

    def layer(h, i):
        return 4 * h * h + 3 * h * i + 2 * h

    for h in hs:
        i = inter(h)
        v0 = min(max(3 * params // 10 // (2 * h), 64), 32000)
        fixed = 2 * v0 * h + h
        if fixed >= params:
            continue
        layers = (params - fixed) // layer(h, i)
        if layers >= max(h // 128, 2):
            vocab = (params - layers * layer(h, i) - h) // (2 * h)
            return h, i, layers, vocab
    h, i = 16, inter(16)
    return h, i, 1, max((params - layer(h, i) - h) // (2 * h), 1)


def model_tensors(params):
    """[(name, shape, is_norm)] in torchtitan's state-dict order."""
    h, i, n_layers, vocab = llama_shape(params)
    t = [("tok_embeddings.weight", (vocab, h), False)]
    for l in range(n_layers):
        p = f"layers.{l}"
        for n, shape in (
            ("attention.wq", (h, h)),
            ("attention.wk", (h, h)),
            ("attention.wv", (h, h)),
            ("attention.wo", (h, h)),
            ("feed_forward.w1", (i, h)),
            ("feed_forward.w2", (h, i)),
            ("feed_forward.w3", (i, h)),
        ):
            t.append((f"{p}.{n}.weight", shape, False))
        t.append((f"{p}.attention_norm.weight", (h,), True))
        t.append((f"{p}.ffn_norm.weight", (h,), True))
    t.append(("norm.weight", (h,), True))
    t.append(("output.weight", (vocab, h), False))
    return t


def gen(seed, *ids):
    # A generator per (seed, ids): values do not depend on the order things are generated in.
    x = seed
    for v in ids:
        x = (x * 1_000_003 + v + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(x)


def state_dict(tensors, base, index, step, a):
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    model = {}
    for j, (name, shape, _) in enumerate(tensors):
        noise = torch.randn(shape, generator=gen(a.seed, 1, j, index))
        model[name] = noise.mul_(a.noise).add_(base[name]).to(dtype)
        del noise
    sd = dict(model)
    if a.optimizer:
        g = gen(a.seed, 2, index)
        sd["optimizer"] = {
            "state": {
                k: {
                    "exp_avg": torch.randn(v.shape, generator=g).mul_(1e-4).to(dtype),
                    "exp_avg_sq": torch.rand(v.shape, generator=g).mul_(1e-6).to(dtype),
                    "step": torch.tensor(float(step)),
                }
                for k, v in model.items()
            },
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}],
        }
    sd["lr_scheduler"] = {"last_epoch": step}
    # Its length grows with the step, so the offsets of later items move between checkpoints.
    sd["dataloader"] = {"state": pickle.dumps({"sample": step * 8, "pad": b"d" * (step // 500)})}
    sd["train_state"] = {"step": step}
    return sd


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def files_of(d):
    return {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/pmad-bench-dcp")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--size", default="500MB", help="bytes of averaged (model) tensors per checkpoint")
    ap.add_argument("--dtype", choices=sorted(ELEM_BYTES), default="f32")
    ap.add_argument("--optimizer", action="store_true", help="add AdamW exp_avg/exp_avg_sq (3 x the size)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--noise", type=float, default=1e-3)
    a = ap.parse_args()
    size = parse_size(a.size)
    elem = ELEM_BYTES[a.dtype]
    tensors = model_tensors(size // elem)
    model_bytes = sum(elem * numel(s) for _, s, _ in tensors)
    os.makedirs(a.dir, exist_ok=True)
    want = {
        "format": FORMAT_VERSION,
        "torch": importlib.metadata.version("torch").split("+")[0],
        "size": size,
        "model_bytes": model_bytes,
        "dtype": a.dtype,
        "optimizer": a.optimizer,
        "seed": a.seed,
        "noise": a.noise,
    }
    paths, todo = [], []
    for index in range(a.count):
        step = 1000 * (index + 1)
        d = os.path.join(a.dir, f"step-{step}")
        rec = os.path.join(a.dir, f"step-{step}.json")
        paths.append(d)
        try:
            with open(rec) as f:
                have = json.load(f)
            if have.get("args") == dict(want, step=step) and os.path.exists(os.path.join(d, ".metadata")) \
                    and files_of(d) == have.get("files"):
                continue
        except (OSError, ValueError):
            pass
        todo.append((index, step, d, rec))
    if todo:
        global torch, dcp
        import torch
        import torch.distributed.checkpoint as dcp

        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        h, i, n_layers, vocab = llama_shape(size // elem)
        print(f"gen_dcp: {len(todo)} of {a.count} checkpoints to write in {a.dir}: {len(tensors)} tensors, "
              f"hidden {h}, intermediate {i}, {n_layers} layers, vocab {vocab}, {model_bytes / 1e6:.1f} MB "
              f"{a.dtype}{' + AdamW moments' if a.optimizer else ''}", file=sys.stderr)
        t0 = time.time()
        base = {}
        for j, (name, shape, norm) in enumerate(tensors):
            b = torch.randn(shape, generator=gen(a.seed, 0, j))
            base[name] = b.mul_(0.1).add_(1.0) if norm else b.mul_(0.02)
        for index, step, d, rec in todo:
            t1 = time.time()
            tmp = d + ".tmp-gen"
            for p in (tmp, d):
                shutil.rmtree(p, ignore_errors=True)
            if os.path.exists(rec):
                os.remove(rec)
            sd = state_dict(tensors, base, index, step, a)
            dcp.save(sd, checkpoint_id=tmp, no_dist=True)
            del sd
            os.rename(tmp, d)
            with open(rec + ".tmp", "w") as f:
                json.dump({"args": dict(want, step=step), "files": files_of(d)}, f, indent=1)
            os.rename(rec + ".tmp", rec)
            print(f"gen_dcp: {d} ({sum(files_of(d).values()) / 1e6:.1f} MB) in {time.time() - t1:.1f} s",
                  file=sys.stderr)
        print(f"gen_dcp: done in {time.time() - t0:.1f} s", file=sys.stderr)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
