#!/usr/bin/env python3
"""Check DCP merge outputs against a float64 recomputation (bench/dcp.sh).

    python bench/peers/dcp_check.py --out pmad=DIR [--out dcp_load=DIR ...] CKPT_DIR...   # oldest first

Reads the inputs with `torch.distributed.checkpoint.load` and sums their averaged tensors
(dcp_common.averaged: floating point, not training state) in float64, then loads each output
the same way and checks:
- its keys, and each tensor's dtype and global shape, are those of the newest input;
- every averaged tensor is within 1 ulp of its dtype of the float64 mean (ulp at the mean's
  magnitude; bf16 8, f16 11, f32 24 significant bits);
- every other key (optimizer, lr_scheduler, dataloader, train_state, non-float tensors) equals
  the newest input exactly (tensors bit for bit, objects by ==).
Prints one line per output, `check NAME: ok ...` or `check NAME: FAILED ...`, and how many
averaged elements are bit-identical to the first output's. Exits 1 if any check fails.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcp_common import averaged, flat_template, metadata, tensor_dtypes  # noqa: E402

# (significant bits including the implicit one, smallest normal exponent)
FORMATS = {
    torch.float64: (53, -1022),
    torch.float32: (24, -126),
    torch.bfloat16: (8, -126),
    torch.float16: (11, -14),
}


def ulp(ref, dtype):
    """The spacing of `dtype` at the magnitude of `ref` (float64), subnormals included."""
    p, emin = FORMATS[dtype]
    _, e = torch.frexp(ref)  # ref = m * 2^e, 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(ref), torch.clamp(e.to(torch.int32) - p, min=emin - p + 1))


def same_bits(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)) \
        if a.numel() else True


def bits(t):
    """The tensor's elements as integers of the same width (for bit-for-bit comparison)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("ckpts", nargs="+")
    a = ap.parse_args()
    t0 = time.time()
    outs = [o.split("=", 1) for o in a.out]
    md = metadata(a.ckpts[-1])
    dtypes = tensor_dtypes(md)
    avg_keys = {k for k, d in dtypes.items() if averaged(k, d)}
    ref = {}
    for c in a.ckpts:
        sd = flat_template(md, avg_keys)
        dcp.load(sd, checkpoint_id=c, no_dist=True)
        for k, v in sd.items():
            if k in ref:
                ref[k] += v.to(torch.float64)
            else:
                ref[k] = v.to(torch.float64)
        del sd
    for v in ref.values():
        v.div_(len(a.ckpts))
    newest = flat_template(md, set(md.state_dict_metadata) - avg_keys)
    dcp.load(newest, checkpoint_id=a.ckpts[-1], no_dist=True)
    n_elems = sum(v.numel() for v in ref.values())
    failed = False
    first = None
    for name, d in outs:
        problems = []
        omd = metadata(d)
        if set(omd.state_dict_metadata) != set(md.state_dict_metadata):
            diff = sorted(set(omd.state_dict_metadata) ^ set(md.state_dict_metadata))
            problems.append(f"keys differ from the newest input's: {diff[:5]}")
        odt = tensor_dtypes(omd)
        for k, dt in dtypes.items():
            if k in odt and (odt[k] != dt or omd.state_dict_metadata[k].size != md.state_dict_metadata[k].size):
                problems.append(f"{k}: {odt[k]} {list(omd.state_dict_metadata[k].size)}, input "
                                f"{dt} {list(md.state_dict_metadata[k].size)}")
        if problems:
            print(f"check {name}: FAILED: {'; '.join(problems[:3])}")
            failed = True
            continue
        sd = flat_template(omd)
        dcp.load(sd, checkpoint_id=d, no_dist=True)
        worst, worst_key, bad = 0.0, None, 0
        for k in sorted(avg_keys):
            got = sd[k].to(torch.float64)
            err = (got - ref[k]).abs() / ulp(ref[k], dtypes[k])
            m = float(err.max()) if err.numel() else 0.0
            if m > worst:
                worst, worst_key = m, k
            bad += int((err > 1.0).sum())
        copied_bad = []
        for k, v in newest.items():
            w = sd[k]
            ok = same_bits(w, v) if isinstance(v, torch.Tensor) else (type(w) is type(v) and w == v)
            if not ok:
                copied_bad.append(k)
        ident = ""
        if first is None:
            first = (name, sd)
        else:
            same = sum(int((bits(sd[k]) == bits(first[1][k])).sum()) for k in avg_keys)
            ident = f"; {100 * same / max(n_elems, 1):.4f}% of averaged elements bit-identical to {first[0]}'s"
        status = "ok" if bad == 0 and not copied_bad else "FAILED"
        failed |= status != "ok"
        print(f"check {name}: {status}: {len(avg_keys)} averaged tensors ({n_elems} elements), "
              f"max error {worst:.3f} ulp{f' ({worst_key})' if worst_key else ''}, {bad} elements over 1 ulp; "
              f"{len(newest) - len(copied_bad)}/{len(newest)} copied keys equal the newest input"
              f"{': differ: ' + ', '.join(copied_bad[:5]) if copied_bad else ''}{ident}")
        if first[0] != name:
            del sd
    print(f"check: {len(a.ckpts)} inputs, {len(outs)} outputs, float64 reference, {time.time() - t0:.1f} s",
          file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
