#!/usr/bin/env python3
"""A stand-in for a Hugging Face Trainer run: writes checkpoint-<step>/ directories.

Each checkpoint holds what pmad reads from a real HF Trainer save, in the same order:
config.json, generation_config.json, model.safetensors (written in place), and
trainer_state.json last (the completeness marker, with learning_rate in log_history).
The weights are a fixed "optimum" plus fresh noise at every save, so averaging the last
checkpoints visibly reduces the noise. Old checkpoints are deleted like save_total_limit does.

Pure standard library (safetensors bytes are packed by hand): runs on python:3.11-slim as is.

    python3 fake_trainer.py --out /tmp/ckpt --interval 1 --max-steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import time
from array import array
from pathlib import Path

DTYPES = {"f32": ("F32", 4), "bf16": ("BF16", 2)}


def model_shapes(vocab: int, hidden: int, layers: int) -> dict[str, list[int]]:
    """A small Llama-like set of tensor names and shapes."""
    shapes = {
        "model.embed_tokens.weight": [vocab, hidden],
        "model.norm.weight": [hidden],
        "lm_head.weight": [vocab, hidden],
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = [hidden]
        shapes[p + "self_attn.q_proj.weight"] = [hidden, hidden]
        shapes[p + "self_attn.k_proj.weight"] = [hidden, hidden]
        shapes[p + "self_attn.v_proj.weight"] = [hidden, hidden]
        shapes[p + "self_attn.o_proj.weight"] = [hidden, hidden]
        shapes[p + "post_attention_layernorm.weight"] = [hidden]
        shapes[p + "mlp.gate_proj.weight"] = [4 * hidden, hidden]
        shapes[p + "mlp.up_proj.weight"] = [4 * hidden, hidden]
        shapes[p + "mlp.down_proj.weight"] = [hidden, 4 * hidden]
    return shapes


def encode(values: list[float], dtype: str) -> bytes:
    """Little-endian F32, or BF16 rounded to nearest even from the F32 bits."""
    buf = array("f", values)
    if sys.byteorder != "little":
        buf.byteswap()
    raw = buf.tobytes()
    if dtype == "f32":
        return raw
    words = struct.unpack(f"<{len(values)}I", raw)
    out = array("H", (((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF for w in words))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]], dtype: str) -> None:
    """safetensors: u64 header length, JSON header (padded to 8 bytes), contiguous data."""
    st_dtype = DTYPES[dtype][0]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:  # in place, like safetensors <= 0.7 (pmad waits for the marker)
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(tensors[name][1])


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """constant_with_warmup: linear warmup, then a plateau (what pmad averages over)."""
    return peak * min(1.0, step / warmup) if warmup > 0 else peak


def save(out: Path, step: int, args: argparse.Namespace, optimum: dict, history: list) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 32),
        "torch_dtype": "float32" if args.dtype == "f32" else "bfloat16",
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")

    rng = random.Random(args.seed * 1_000_003 + step)
    tensors = {}
    for name, (shape, centre) in optimum.items():
        noisy = [c + rng.gauss(0.0, args.noise) for c in centre]
        tensors[name] = (shape, encode(noisy, args.dtype))
    write_safetensors(ckpt / "model.safetensors", tensors, args.dtype)

    first = history[-1]["step"] + args.logging_steps if history else args.logging_steps
    for s in range(first, step + 1, args.logging_steps):
        loss = 2.0 + 8.0 * math.exp(-s / 500.0) + args.noise * rng.random()
        history.append({"step": s, "learning_rate": learning_rate(s, args.lr, args.warmup_steps), "loss": round(loss, 4)})
    state = {"global_step": step, "max_steps": args.max_steps, "log_history": history}
    (ckpt / "trainer_state.json").write_text(json.dumps(state) + "\n")  # last: the marker
    return ckpt


def rotate(out: Path, keep: int) -> None:
    """save_total_limit: delete the oldest checkpoints beyond `keep`."""
    if keep <= 0:
        return
    steps = sorted(
        int(p.name.split("-", 1)[1])
        for p in out.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    for s in steps[:-keep]:
        shutil.rmtree(out / f"checkpoint-{s}", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/ckpt"), help="TrainingArguments.output_dir")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between saves")
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--max-steps", type=int, default=0, help="0 = run until stopped")
    ap.add_argument("--save-total-limit", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05, help="std of the per-save noise")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # PID 1 in a container gets no default SIGTERM action: exit promptly on `compose stop`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.umask(0o022)  # checkpoints readable by pmad's user (65532)
    args.out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(args.seed)
    optimum = {
        name: (shape, [rng.gauss(0.0, 0.02) for _ in range(math.prod(shape))])
        for name, shape in model_shapes(args.vocab, args.hidden, args.layers).items()
    }
    existing = [int(p.name.split("-", 1)[1]) for p in args.out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    step = max(existing, default=0)  # resume after a restart, like resume_from_checkpoint
    history: list[dict] = []
    if step:
        try:
            history = json.loads((args.out / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
        except (OSError, ValueError, KeyError):
            history = []
    params = sum(len(c) for _, c in optimum.values())
    print(f"fake trainer: {params} params ({args.dtype}), saving every {args.interval}s to {args.out}", flush=True)

    while args.max_steps == 0 or step < args.max_steps:
        time.sleep(args.interval)
        step += args.save_steps
        t0 = time.monotonic()
        ckpt = save(args.out, step, args, optimum, history)
        rotate(args.out, args.save_total_limit)
        lr = learning_rate(step, args.lr, args.warmup_steps)
        print(f"saved {ckpt} lr={lr:.2e} in {time.monotonic() - t0:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
