#!/usr/bin/env python3
"""The obvious hand-written checkpoint average (bench/run.sh peer (d)).

    python bench/peers/torch_avg.py OUT_DIR CKPT_DIR...

Loads each checkpoint's *.safetensors with safetensors.torch.load_file, accumulates every
tensor in float32, divides by the count and writes one bf16 model.safetensors with save_file
(float tensors only are averaged; others are taken from the newest checkpoint). No fsync,
no atomic publish: what a user writes in five minutes.
"""
import glob
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def load(ckpt):
    sd = {}
    for f in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        sd.update(load_file(f))
    return sd


def main():
    out, ckpts = sys.argv[1], sys.argv[2:]
    acc = None
    for c in ckpts:
        sd = load(c)
        if acc is None:
            acc = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                if v.is_floating_point():
                    acc[k] += v.float()
                else:
                    acc[k] = v
        del sd
    n = len(ckpts)
    merged = {k: (v / n).to(torch.bfloat16) if v.is_floating_point() else v for k, v in acc.items()}
    del acc
    os.makedirs(out, exist_ok=True)
    save_file(merged, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
