#!/usr/bin/env python3
"""Fixture generator for pmad's integration tests. Never uses pmad itself.

  fixtures.py make --out DIR --dtype bf16|f16|f32 [--sharded K] [--seed S] [--step N]
                   [--layout dir|file] [--scale X] [--nonfinite nan|inf] [--no-edge]
  fixtures.py hostile --kind KIND --out DIR --from GOOD_CKPT

`make` writes a tiny HF-style checkpoint with the reference `safetensors` package. Float
tensors are base weights drawn from a fixed seed (the same for every checkpoint, like one
training run) plus per-checkpoint noise drawn from --seed, times --scale. The tensor
`model.layers.0.mlp.up_proj.weight` starts with edge values that --scale does not touch
(see EDGE_TENSOR); integer and bool tensors differ for every seed, so a test can tell which
input they were copied from. Every directory checkpoint also gets decoy files that a merger
must not copy.

`hostile` copies a good checkpoint (re-serialised as a single file, or as 2 shards for the
index-* kinds) into DIR and gives it exactly one defect, described on stdout.
"""

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import ml_dtypes  # registers numpy's "bfloat16" dtype, which safetensors.numpy needs for BF16
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}

# (name, shape) of the float tensors, in a fixed order (it also drives the seeding).
FLOAT_TENSORS = [
    ("model.embed_tokens.weight", (37, 24)),
    ("model.layers.0.self_attn.q_proj.weight", (24, 24)),
    ("model.layers.0.mlp.up_proj.weight", (61, 24)),
    ("model.norm.weight", (24,)),
    ("scale", ()),
    ("empty", (0, 5)),
]
# Tensors whose base value is 1 (norm gains, scalars) rather than 0.
ONE_CENTRED = {"model.norm.weight", "scale"}
EDGE_TENSOR = "model.layers.0.mlp.up_proj.weight"
NONFINITE_TENSOR = "model.layers.0.self_attn.q_proj.weight"
NONFINITE_INDEX = (0, 5)

BASE_STD = 0.02  # spread of the shared base weights
NOISE_STD = 0.002  # spread of the per-checkpoint noise: checkpoints of a run stay close

DECOYS = {
    "optimizer.pt": 96,  # name -> size of the random payload
    "training_args.bin": 32,
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Byte size of one element per safetensors dtype (the dtypes this script may meet).
DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def shard_name(i, k):
    return f"model-{i:05d}-of-{k:05d}.safetensors"


def edge_values(dtype, seed, rng):
    """Values written at the start of EDGE_TENSOR (flat order), identical in shape for all seeds.

    - 0.0 and -0.0;
    - the smallest subnormal, and a small multiple of it that varies with the seed, so averages
      land between subnormals and must be rounded there;
    - +/- values just below max/2 (per seed): a weighted mean stays finite, but summing inputs
      before weighting overflows;
    - rounding ties: 1 + (s%2) ulp and 1 + (1 + s%2) ulp. The mean of two checkpoints of
      different seed parity is exactly halfway between two representable values, and
      round-to-nearest-even must pick 1.0 and 1 + 2 ulp respectively.
    """
    info = ml_dtypes.finfo(dtype)
    sub = float(info.smallest_subnormal)
    half_max = float(info.max) / 2
    eps = float(info.eps)
    return [
        0.0,
        -0.0,
        sub,
        sub * (seed % 4 + 1),
        half_max * (1 - 0.01 * rng.random()),
        -half_max * (1 - 0.01 * rng.random()),
        1.0 + (seed % 2) * eps,
        1.0 + (1 + seed % 2) * eps,
    ]


def make_tensors(dtype, seed, scale, nonfinite, edge):
    """Build the name -> numpy array dict of one checkpoint."""
    tensors = {}
    for idx, (name, shape) in enumerate(FLOAT_TENSORS):
        base = np.random.default_rng([0, idx]).normal(0.0, BASE_STD, shape)
        if name in ONE_CENTRED:
            base += 1.0
        noise = np.random.default_rng([1, seed, idx]).normal(0.0, NOISE_STD, shape)
        # asarray: for shape () numpy hands back scalars, which safetensors cannot write.
        values = np.asarray((base + noise) * scale).astype(dtype)
        if name == EDGE_TENSOR and edge:
            special = edge_values(dtype, seed, np.random.default_rng([2, seed]))
            values.reshape(-1)[: len(special)] = np.array(special, dtype=np.float64).astype(dtype)
        if name == NONFINITE_TENSOR and nonfinite:
            values[NONFINITE_INDEX] = np.nan if nonfinite == "nan" else np.inf
        tensors[name] = values
    # Integer and bool tensors: distinct for every seed (seeds 0..511 for the mask).
    tensors["position_ids"] = (np.arange(17, dtype=np.int64) + 17 * seed).reshape(1, 17)
    bits = [((seed >> i) & 1) ^ (i % 2) for i in range(9)]
    tensors["mask"] = np.array(bits, dtype=bool).reshape(3, 3)
    return tensors


def save_verified(tensors, path):
    """Write one safetensors file and read it back with the reference reader."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(tensors), path
        for name, want in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, (path, name)
            assert got.tobytes() == want.tobytes(), (path, name)


def write_weights(out_dir, tensors, shards):
    """Write `model.safetensors` (shards == 0) or `shards` shard files plus the HF index."""
    if shards == 0:
        save_verified(tensors, out_dir / SINGLE_NAME)
        return
    names = list(tensors)
    weight_map = {}
    # Contiguous groups of near-equal count, like HF's sequential shard filling.
    for i, group in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        fname = shard_name(i, shards)
        part = {names[j]: tensors[names[j]] for j in group}
        save_verified(part, out_dir / fname)
        weight_map.update({name: fname for name in part})
    # HF's total_size: the tensors' data bytes (not the files' sizes).
    total = sum(int(t.nbytes) for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / INDEX_NAME, index)


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_aux(out_dir, dtype_name, seed, step):
    """config/tokenizer files a merger copies, plus decoys it must not copy."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 24,
        "intermediate_size": 61,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 37,
        "max_position_embeddings": 17,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype_name],
        # Not HF fields: let a test check which input the copied config came from.
        "fixture_seed": seed,
        "fixture_step": step,
    }
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "tokenizer_config.json",
               {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 17,
                "fixture_seed": seed})
    rng = np.random.default_rng([3, seed])
    for name, size in DECOYS.items():
        (out_dir / name).write_bytes(rng.bytes(size))
    logged = range(max(10, step - 40), step + 1, 10)
    write_json(out_dir / "trainer_state.json", {
        "global_step": step,
        "max_steps": 10 * step + 1000,
        "log_history": [{"step": s, "learning_rate": 0.003, "loss": 2.0 - s * 1e-4,
                         "grad_norm": 0.4, "epoch": s / 1000} for s in logged],
    })


def fresh_dir(path):
    if path.exists() and any(path.iterdir()):
        sys.exit(f"fixtures: refusing to write into non-empty {path}")
    path.mkdir(parents=True, exist_ok=True)


def cmd_make(args):
    dtype = DTYPES[args.dtype]
    tensors = make_tensors(dtype, args.seed, args.scale, args.nonfinite, not args.no_edge)
    if args.sharded is not None and not 1 <= args.sharded <= len(tensors):
        sys.exit(f"fixtures: --sharded must be between 1 and {len(tensors)}")
    out = Path(args.out)
    if args.layout == "file":
        if args.sharded is not None:
            sys.exit("fixtures: --sharded needs --layout dir")
        if out.exists():
            sys.exit(f"fixtures: refusing to overwrite {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_verified(tensors, out)
        print(f"fixtures: wrote {out} ({args.dtype}, {len(tensors)} tensors, seed {args.seed})")
        return
    fresh_dir(out)
    write_weights(out, tensors, args.sharded or 0)
    write_aux(out, args.dtype, args.seed, args.step)
    layout = f"{args.sharded} shards" if args.sharded else "single file"
    print(f"fixtures: wrote {out} ({args.dtype}, {len(tensors)} tensors, {layout}, "
          f"seed {args.seed}, step {args.step})")


# ---------------------------------------------------------------- hostile variants


def load_checkpoint(src):
    """Tensors of a good checkpoint (dir, sharded dir or bare file) and its non-weight files."""
    if src.is_file():
        files, aux = [src], []
    elif (src / INDEX_NAME).exists():
        weight_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
        files = [src / f for f in sorted(set(weight_map.values()))]
        aux = [p for p in src.iterdir() if p.name != INDEX_NAME and p not in files]
    else:
        files = [src / SINGLE_NAME]
        aux = [p for p in src.iterdir() if p.name != SINGLE_NAME]
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors, aux


def read_raw(path):
    """Split a safetensors file into (header dict, data bytes)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header_text, data):
    """Write header text (padded with spaces to a multiple of 8, as writers do) and data."""
    head = header_text.encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def encode_header(pairs):
    """Header JSON from (key, value) pairs; unlike json.dumps it allows duplicate keys."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def by_offset(header):
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def data_bytes(entry):
    begin, end = entry["data_offsets"]
    return end - begin


def victim(header):
    """The largest tensor of rank >= 1 that is not last in the data buffer."""
    order = by_offset(header)
    candidates = [k for k in order[:-1] if header[k]["shape"]]
    return max(candidates, key=lambda k: data_bytes(header[k]))


def row_bytes(entry):
    return int(np.prod(entry["shape"][1:], dtype=np.int64)) * DTYPE_SIZE[entry["dtype"]]


def reshape_victim(path, rows, move_end):
    """Add `rows` rows to the victim's shape; also move its end offset if `move_end`."""
    header, data = read_raw(path)
    name = victim(header)
    entry = header[name]
    entry["shape"][0] += rows
    if move_end:
        entry["data_offsets"][1] += rows * row_bytes(entry)
        assert entry["data_offsets"][1] <= len(data)
    write_raw(path, encode_header(header.items()), data)
    return name, entry


def hostile_single(kind, path):
    """Apply a single-file defect to `path`; return a description."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "truncated":
        path.write_bytes(raw[:-5])
        return "last 5 bytes dropped"
    if kind == "corrupt-header":
        # Drop the closing brace: still starts with '{' and is UTF-8, but is not JSON.
        close = raw.rindex(b"}", 8, 8 + n)
        path.write_bytes(raw[:close] + b" " + raw[close + 1:])
        return "header JSON lost its closing brace"
    if kind == "header-too-large":
        path.write_bytes(struct.pack("<Q", 100_000_001) + raw[8:])
        return "header length field = 100000001"
    if kind == "not-utf8":
        at = raw.index(b'"pt"', 8, 8 + n)
        path.write_bytes(raw[:at + 1] + b"\xff\xfe" + raw[at + 3:])
        return 'metadata value "pt" replaced by bytes ff fe'
    if kind == "overlap":
        name, entry = reshape_victim(path, 1, move_end=True)
        return f"{name} grown by one row to {entry['data_offsets']}, into the next tensor"
    if kind == "gap":
        name, entry = reshape_victim(path, -1, move_end=True)
        return f"{name} shrunk by one row to {entry['data_offsets']}, leaving a gap"
    if kind == "bad-size":
        name, entry = reshape_victim(path, 1, move_end=False)
        return f"{name} claims shape {entry['shape']} but keeps offsets {entry['data_offsets']}"
    if kind == "duplicate-name":
        header, data = read_raw(path)
        first = victim(header)
        order = by_offset(header)
        second = order[order.index(first) + 1]
        pairs = [(first if k == second else k, v) for k, v in header.items()]
        write_raw(path, encode_header(pairs), data)
        return f"{second} renamed to {first}: the header names {first} twice"
    raise AssertionError(kind)


def hostile_index(kind, out):
    """Apply an index defect to the 2-shard checkpoint `out`; return a description."""
    second = shard_name(2, 2)
    index = json.loads((out / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    in_second = [k for k, v in weight_map.items() if v == second]
    if kind == "index-missing-shard":
        (out / second).unlink()
        return f"{second} deleted; the index still names it"
    if kind == "index-symlink-out":
        outside = out.parent / f"{out.name}-outside"
        outside.mkdir(exist_ok=True)
        target = (outside / second).resolve()
        shutil.move(out / second, target)
        (out / second).symlink_to(target)
        return f"{second} is a symlink to {target}"
    if kind == "index-dotdot":
        # Leaves the dir by name only: the path resolves back to the real shard, so a reader
        # that follows it blindly succeeds and only a name check catches it.
        bad = f"../{out.name}/{second}"
        weight_map.update({k: bad for k in in_second})
        what = f"tensors of {second} mapped to {bad}"
    elif kind == "index-absolute":
        weight_map.update({k: "/etc/passwd" for k in in_second})
        what = f"tensors of {second} mapped to /etc/passwd"
    elif kind == "index-disagree":
        first, _ = read_raw(out / shard_name(1, 2))
        # The largest tensor, so the lie is not hidden by an empty one.
        moved = max(by_offset(first), key=lambda k: data_bytes(first[k]))
        weight_map[moved] = second
        what = f"{moved} mapped to {second}, which does not contain it"
    else:
        raise AssertionError(kind)
    write_json(out / INDEX_NAME, index)
    return what


SINGLE_KINDS = ["truncated", "corrupt-header", "header-too-large", "overlap", "gap",
                "bad-size", "not-utf8", "duplicate-name"]
INDEX_KINDS = ["index-missing-shard", "index-dotdot", "index-absolute", "index-symlink-out",
               "index-disagree"]


def cmd_hostile(args):
    tensors, aux = load_checkpoint(Path(args.from_))
    out = Path(args.out)
    fresh_dir(out)
    for path in aux:
        shutil.copy2(path, out / path.name)
    if args.kind in INDEX_KINDS:
        write_weights(out, tensors, 2)
        what = hostile_index(args.kind, out)
    else:
        write_weights(out, tensors, 0)
        what = hostile_single(args.kind, out / SINGLE_NAME)
    print(f"fixtures: hostile {args.kind} -> {out}: {what}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    make = sub.add_parser("make", help="write a good checkpoint")
    make.add_argument("--out", required=True, help="checkpoint dir (or file with --layout file)")
    make.add_argument("--dtype", required=True, choices=sorted(DTYPES))
    make.add_argument("--sharded", type=int, metavar="K", help="K shards plus the HF index")
    make.add_argument("--seed", type=int, default=0, help="per-checkpoint noise seed (>= 0)")
    make.add_argument("--step", type=int, default=100, help="global_step in trainer_state.json")
    make.add_argument("--layout", choices=["dir", "file"], default="dir")
    make.add_argument("--scale", type=float, default=1.0, help="multiplies the random values")
    make.add_argument("--nonfinite", choices=["nan", "inf"],
                      help=f"put it at {NONFINITE_TENSOR}{list(NONFINITE_INDEX)}")
    make.add_argument("--no-edge", action="store_true",
                      help=f"no edge values in {EDGE_TENSOR} (e.g. for narrowing to f16)")
    make.set_defaults(func=cmd_make)

    hostile = sub.add_parser("hostile", help="write a corrupted copy of a good checkpoint")
    hostile.add_argument("--kind", required=True, choices=SINGLE_KINDS + INDEX_KINDS)
    hostile.add_argument("--out", required=True)
    hostile.add_argument("--from", dest="from_", required=True, metavar="GOOD_CKPT")
    hostile.set_defaults(func=cmd_hostile)

    args = parser.parse_args()
    if getattr(args, "seed", 0) < 0:
        make.error("--seed must be >= 0")
    args.func(args)


if __name__ == "__main__":
    main()
