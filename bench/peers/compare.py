#!/usr/bin/env python3
"""Compare merged checkpoints tensor by tensor (bench/run.sh).

    python bench/peers/compare.py REF_DIR OTHER_DIR...

Every *.safetensors file of each directory is opened lazily (safe_open), so memory stays at
about two tensors. For each OTHER against REF: same tensor names, shapes and dtypes, then the
largest difference in units in the last place (ulps, counted on the ordered integer encoding,
so it is exact for bf16/f16/f32) and the largest absolute difference.

Near zero, ulps say little: where the inputs cancel (|mean| far below the tensor's scale), two
correct f32 accumulations that round differently can land on +tiny and -tiny, many ulps apart
but equal to f32 precision. So elements with max(|a|,|b|) < 2^-10 * max|REF tensor| are
"cancelled": they are held to an absolute bound of one ulp at that threshold (2^-10 *
max|REF tensor| * 2^-mantissa_bits: 2^-17 of the tensor's scale for bf16) instead of the ulp
bound. Prints one line per OTHER:
`compare REF OTHER: tensors=N elements=E max_ulp=U n_diff=D max_abs=A cancelled_vs_bound=C ok`
where max_ulp is over the other elements, and exits 1 if names/shapes/dtypes differ or a
bound (--max-ulp, default 1) is exceeded.
"""
import argparse
import glob
import os
import sys

import torch
from safetensors import safe_open

MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
       torch.float64: torch.int64}


def index(d):
    m = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                m[k] = f
    return m


def get(path, name, cache):
    h = cache.get(path)
    if h is None:
        cache.clear()
        h = cache[path] = safe_open(path, framework="pt").__enter__()
    return h.get_tensor(name)


def ordered(t):
    """Map floats to integers whose order and spacing follow the floats (1 ulp = 1)."""
    i = t.view(INT[t.dtype]).to(torch.int64)
    bits = torch.iinfo(INT[t.dtype]).bits
    sign = 1 << (bits - 1)
    neg = i < 0
    return torch.where(neg, -(i & (sign - 1)), i)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("others", nargs="+")
    ap.add_argument("--max-ulp", type=int, default=1)
    a = ap.parse_args()
    ref = index(a.ref)
    ok = True
    for o in a.others:
        oth = index(o)
        if set(ref) != set(oth):
            print(f"compare {a.ref} {o}: tensor names differ: only in ref {sorted(set(ref) - set(oth))[:5]}, "
                  f"only in other {sorted(set(oth) - set(ref))[:5]}")
            ok = False
            continue
        c1, c2 = {}, {}
        max_ulp, n_diff, max_abs, elems, bad = 0, 0, 0.0, 0, []
        canc_rel = 0.0  # worst |a-b| / (its bound) among cancelled elements
        for k in sorted(ref):
            x, y = get(ref[k], k, c1), get(oth[k], k, c2)
            if x.shape != y.shape or x.dtype != y.dtype:
                bad.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
                continue
            elems += x.numel()
            if x.dtype in INT:
                d = (ordered(x) - ordered(y)).abs()
                xd, yd = x.double(), y.double()
                ad = (xd - yd).abs()
                scale = float(xd.abs().max()) if x.numel() else 0.0
                canc = torch.maximum(xd.abs(), yd.abs()) < scale * 2.0**-10
                if bool((~canc).any()):
                    max_ulp = max(max_ulp, int(d[~canc].max()))
                if bool(canc.any()) and scale > 0:
                    bound = scale * 2.0**-10 * 2.0**-MANT[x.dtype] * a.max_ulp
                    canc_rel = max(canc_rel, float(ad[canc].max()) / bound)
                n_diff += int((d != 0).sum())
                max_abs = max(max_abs, float(ad.max()) if x.numel() else 0.0)
            elif not torch.equal(x, y):
                bad.append(f"{k}: values differ")
        status = "ok" if not bad and max_ulp <= a.max_ulp and canc_rel <= 1.0 else "MISMATCH"
        print(f"compare {os.path.basename(a.ref.rstrip('/'))} {os.path.basename(o.rstrip('/'))}: "
              f"tensors={len(ref)} elements={elems} max_ulp={max_ulp} n_diff={n_diff} "
              f"max_abs={max_abs:.3g} cancelled_vs_bound={canc_rel:.2g} {status}")
        for b in bad[:5]:
            print(f"  {b}")
        ok = ok and status == "ok"
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
