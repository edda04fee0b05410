#!/usr/bin/env python3
"""The obvious Python average of DCP checkpoints (bench/dcp.sh's peers), two ways.

    python bench/peers/dcp_torch_avg.py --route dcp_load OUT_DIR CKPT_DIR...   # oldest first
    python bench/peers/dcp_torch_avg.py --route convert [--tmp DIR] OUT_DIR CKPT_DIR...

Both write a DCP checkpoint equivalent to `pmad merge --method sma`'s: the same keys, every
averaged tensor (floating point, not training state: see dcp_common.averaged) as the mean of
the inputs in the input dtype, everything else (optimizer moments, lr_scheduler, dataloader,
train_state) from the newest (last) checkpoint. The sum is kept in float32 for 16-bit inputs
and in float64 for float32 inputs (an f32 sum of 8 f32 values is not within 1 ulp of the
mean everywhere; pmad's merge.json says "accumulator": "f64" for them too).

--route dcp_load  build a state dict of empty tensors from the newest checkpoint's
                  `.metadata` (dtypes and shapes), `torch.distributed.checkpoint.load` each
                  checkpoint into it in turn and add it to the sum; divide, cast, and
                  `dcp.save(..., no_dist=True)` the nested state dict the newest was saved from.
--route convert   `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` each
                  checkpoint to a .pt file (in --tmp, default OUT_DIR.convert-tmp, removed at
                  the end), `torch.load(mmap=True)` each, sum, divide, cast, `dcp.save`.

`dcp.save` fsyncs the data files it writes (FileSystemWriter's sync_files=True); the script
then fsyncs every file of OUT_DIR and the directory itself, so its time includes making the
output durable like pmad's. Prints one line on stdout, seconds:
`route=.. import_s=.. read_s=.. sum_s=.. save_s=.. fsync_s=.. total_s=..` (total_s from the
start of the process, import of torch included). OUT_DIR must not exist.
"""
import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcp_common import acc_dtype, averaged, flat_template, flatten, metadata, unflatten  # noqa: E402

T_IMPORT = time.time()


def fsync_tree(d):
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add(acc, fqn, t):
    if fqn in acc:
        acc[fqn] += t.to(acc[fqn].dtype)
    else:
        acc[fqn] = t.to(acc_dtype(t.dtype), copy=True)


def route_dcp_load(out, ckpts, times):
    md = metadata(ckpts[-1])
    sd = flat_template(md)
    acc = {}
    for c in ckpts:
        t0 = time.time()
        dcp.load(sd, checkpoint_id=c, no_dist=True)
        t1 = time.time()
        for fqn, v in sd.items():
            if isinstance(v, torch.Tensor) and averaged(fqn, v.dtype):
                add(acc, fqn, v)
        times["read_s"] += t1 - t0
        times["sum_s"] += time.time() - t1
    # sd now holds the newest checkpoint: replace its averaged tensors by the mean.
    t0 = time.time()
    n = len(ckpts)
    for fqn, s in acc.items():
        sd[fqn] = s.div_(n).to(sd[fqn].dtype)
    del acc
    times["sum_s"] += time.time() - t0
    return unflatten(sd, md)


def route_convert(out, ckpts, times, tmp):
    os.makedirs(tmp, exist_ok=True)
    try:
        acc = {}
        newest = None
        for i, c in enumerate(ckpts):
            t0 = time.time()
            pt = os.path.join(tmp, f"{i}.pt")
            dcp_to_torch_save(c, pt)
            sd = torch.load(pt, mmap=True)
            t1 = time.time()
            for fqn, v in flatten(sd).items():
                if isinstance(v, torch.Tensor) and averaged(fqn, v.dtype):
                    add(acc, fqn, v)
            times["read_s"] += t1 - t0
            times["sum_s"] += time.time() - t1
            newest = sd
        t0 = time.time()
        n = len(ckpts)

        def put(node, prefix):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in list(items):
                key = f"{prefix}{k}"
                if isinstance(v, (dict, list)):
                    put(v, key + ".")
                elif key in acc:
                    node[k] = acc.pop(key).div_(n).to(v.dtype)

        put(newest, "")
        assert not acc, f"averaged keys not placed back: {sorted(acc)[:5]}"
        times["sum_s"] += time.time() - t0
        return newest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--route", choices=("dcp_load", "convert"), required=True)
    ap.add_argument("--tmp", help="convert: where the .pt files go (default OUT_DIR.convert-tmp)")
    ap.add_argument("out")
    ap.add_argument("ckpts", nargs="+", help="DCP checkpoint directories, oldest first")
    a = ap.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"dcp_torch_avg: {a.out} exists")
    times = {"read_s": 0.0, "sum_s": 0.0}
    if a.route == "dcp_load":
        sd = route_dcp_load(a.out, a.ckpts, times)
    else:
        sd = route_convert(a.out, a.ckpts, times, a.tmp or a.out.rstrip("/") + ".convert-tmp")
    t0 = time.time()
    dcp.save(sd, checkpoint_id=a.out, no_dist=True)
    t1 = time.time()
    fsync_tree(a.out)
    t2 = time.time()
    print(
        f"route={a.route} import_s={T_IMPORT - T_START:.3f} read_s={times['read_s']:.3f} "
        f"sum_s={times['sum_s']:.3f} save_s={t1 - t0:.3f} fsync_s={t2 - t1:.3f} total_s={t2 - T_START:.3f}"
    )


if __name__ == "__main__":
    main()
