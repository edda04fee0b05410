#!/usr/bin/env python3
"""Independent oracle for `pmad merge` outputs.

  oracle.py check --method sma|wma|ema|weights|schedule [--alpha A] [--weights w1,w2,..]
                  [--shape linear|cosine|minus_sqrt] [--final-lr-ratio R]
                  [--dtype source|bf16|f16|f32] [--f32-within inputs|mean] OUT CKPT...

CKPTs are given oldest first, as to pmad. Each is a checkpoint dir (model.safetensors, or
shards plus model.safetensors.index.json) or a bare .safetensors file. OUT is pmad's output dir.
Everything is read with the reference `safetensors` package; the merge is recomputed in float64.

Checks:
- OUT layout: model.safetensors, or shards `model-0000i-of-0000K.safetensors` (all of 1..K, no
  strays) plus an index whose weight_map keys are sorted, whose shard names are plain file
  names, which agrees with the shards' contents, and whose metadata.total_size is the sum of
  the tensors' data bytes (HF's definition). Every file loads with safe_open and its
  __metadata__ has "format": "pt".
- The same tensor names and shapes as the inputs.
- Float tensors (F16 BF16 F32 F64): the output dtype is the requested one (source = the
  inputs' dtype), and every element matches the float64 weighted mean m = sum_i w_i x_i:
    * BF16/F16 outputs: within 1 ulp of m rounded to the output dtype with
      round-to-nearest-even, or within the float64 mean's own error bound (8 n eps64 max|x_i|)
      of m, where exactly cancelling inputs leave m a tiny artefact of the inexact weights. Distance is counted in representable values (see `ordinal`), so
      +0/-0, subnormals and the step from the largest finite value to inf are handled.
    * F32/F64 outputs: |out - m| <= 1e-6 * max(|m|, max_i |x_i|, f32 tiny). Relative to the
      inputs' magnitude, not to |m| alone: when inputs cancel, m is near 0 and an f32
      accumulator's rounding errors (of the order of the inputs) dwarf it. With
      `--f32-within mean`, relative to m itself: |out - m| <= 1e-6 |m| + the float64 mean's own
      error bound (8 n eps64 max|x_i|), which only an f64 accumulator meets where inputs
      cancel.
    * NaN must stay NaN. An infinite m, or one that rounds to inf, needs that inf, up to the
      tolerances above (e.g. a BF16 output may hold the largest finite value, 1 ulp away).
- Integer and bool tensors: byte for byte equal to the newest input.
- merge.json: `method` equals --method and `weights` (oldest -> newest) equals the oracle's
  weights within 1e-12.
- Side files: the config/tokenizer files present in the newest input dir are copied byte for
  byte; training-only files (optimizer.pt, trainer_state.json, ...) are absent.

Weights (oldest = 1 .. newest = N): sma 1/N; wma i / (N(N+1)/2); weights: given, renormalised
to sum 1; ema: e_1 = x_1, e_k = a x_k + (1-a) e_{k-1}, i.e. w_1 = (1-a)^(N-1),
w_k = a (1-a)^(N-k); schedule: with the decay's LR multiplier f (linear 1 - x, cosine
(1 + cos(pi x)) / 2, minus_sqrt 1 - sqrt(x)) floored at the final ratio r as g = r + (1 - r) f,
the k-th oldest (k = 0..N-1) gets g(k/N) - g((k+1)/N), the newest g((N-1)/N).

Exit 0 with a one-line summary when everything matches, 1 with the first mismatches when
something does not, 2 when the arguments or inputs themselves are unusable, 3 on an internal
error of the oracle.
"""

import argparse
import json
import math
import re
import struct
import sys
import traceback
from pathlib import Path

import ml_dtypes  # registers numpy's "bfloat16" dtype; safe_open needs it to return BF16
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

FLOAT_DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32,
                "F64": np.float64}
ULP_DTYPES = {"F16", "BF16"}
REQUESTED = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
INT_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}

REL_TOL = 1e-6
WEIGHT_TOL = 1e-12
TINY = float(np.finfo(np.float32).tiny)

# docs/formats.md: files a merged output copies from the newest input, and files it never copies.
COPIED = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "tokenizer.model", "special_tokens_map.json", "vocab.json", "vocab.txt",
          "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json",
          "preprocessor_config.json"]
NEVER_COPIED = re.compile(r"optimizer\.pt|scheduler\.pt|rng_state.*|training_args\.bin|"
                          r"trainer_state\.json")

MAX_REPORTED = 20  # mismatch lines printed before giving up
PER_TENSOR = 5  # mismatching elements shown per tensor


class Unusable(Exception):
    """The oracle cannot run: bad arguments or inputs (exit 2)."""


class Broken(Exception):
    """pmad's output cannot be read at all: a mismatch that ends the check (exit 1)."""


class BadFiles(Exception):
    """safe_open rejected a file, or files of one checkpoint hold the same tensor."""


# ------------------------------------------------------------------------- reading


def read_header(path):
    """The JSON header of a safetensors file (safe_open does the validation)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class Tensor:
    """One tensor of a checkpoint: safetensors dtype string, shape, data size and file."""

    def __init__(self, name, entry, path):
        self.name, self.path = name, path
        self.dtype, self.shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        self.nbytes = end - begin

    def load(self):
        with safe_open(str(self.path), framework="numpy") as f:
            return f.get_tensor(self.name)


def catalog(files):
    """name -> Tensor over the safetensors files of one checkpoint."""
    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
        except SafetensorError as e:
            raise BadFiles(f"{path}: safe_open: {e}") from e
        header = read_header(path)
        for name in names:
            if name in tensors:
                raise BadFiles(f"{name} is in both {tensors[name].path} and {path}")
            tensors[name] = Tensor(name, header[name], path)
    return tensors


def open_input(ckpt):
    """Catalog of an input checkpoint (dir, sharded dir or bare file)."""
    path = Path(ckpt)
    try:
        if path.is_file():
            return catalog([path])
        if (path / INDEX_NAME).exists():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            tensors = catalog([path / f for f in sorted(set(weight_map.values()))])
            if set(tensors) != set(weight_map):
                raise Unusable(f"{path}: index and shards list different tensors")
            return tensors
        if (path / SINGLE_NAME).exists():
            return catalog([path / SINGLE_NAME])
    except BadFiles as e:
        raise Unusable(str(e)) from e
    raise Unusable(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")


# ------------------------------------------------------------------------ rounding


def round_to(x, dtype):
    """Round float64 values to a safetensors float dtype with round-to-nearest-even.

    numpy rounds float64 -> float32/float16 correctly, but ml_dtypes converts float64 ->
    bfloat16 through float32, rounding twice (1 + 2^-8 + 2^-30 becomes 1.0 instead of
    1 + 2^-7). So for BF16 we first round to float32 *to odd* (on inexact results pick the
    neighbour with an odd last bit): with 16 spare bits that keep the inexactness, the second
    rounding, float32 -> bfloat16, then gives the correctly rounded result (round-to-odd).
    """
    if dtype != "BF16":
        with np.errstate(over="ignore"):
            return x.astype(FLOAT_DTYPES[dtype])
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np.float32)
        inexact = (r.astype(np.float64) != x) & ~np.isnan(x)
    fix = inexact & ((r.view(np.uint32) & 1) == 0)
    # x lies strictly between r and its neighbour towards x (for r = inf: the largest float).
    r[fix] = np.nextafter(r[fix], np.where(x[fix] > r[fix], np.inf, -np.inf).astype(np.float32))
    return r.astype(ml_dtypes.bfloat16)


def ordinal(a):
    """Map 16-bit floats to integers that count representable values (+0 and -0 both 0)."""
    bits = a.view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


# ------------------------------------------------------------------------- weights


SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "minus_sqrt": lambda x: 1.0 - math.sqrt(x),
}


def merge_weights(method, n, alpha, given, shape=None, final_lr_ratio=0.0):
    """Weights of the n checkpoints, oldest first (see the module docstring)."""
    if method == "schedule":
        if shape not in SHAPES:
            raise Unusable(f"--method schedule needs --shape, one of {', '.join(SHAPES)}")
        r = final_lr_ratio
        if not 0.0 <= r <= 1.0:
            raise Unusable("--final-lr-ratio must be in [0, 1]")
        g = [r + (1.0 - r) * SHAPES[shape](k / n) for k in range(n)]
        return [g[k] - g[k + 1] for k in range(n - 1)] + [g[n - 1]]
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method == "ema":
        if alpha is None or not 0.0 < alpha <= 1.0:
            raise Unusable("--method ema needs --alpha in (0, 1]")
        return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - k) for k in range(2, n + 1)]
    if given is None or len(given) != n:
        raise Unusable(f"--method weights needs {n} --weights, one per checkpoint")
    total = sum(given)
    if total == 0:
        raise Unusable("--weights sum to 0")
    return [w / total for w in given]


# ------------------------------------------------------------------------ checking


class Report:
    def __init__(self):
        self.failures = []
        self.tensors = 0
        self.elements = 0
        self.max_ulp = {"BF16": 0, "F16": 0}
        self.max_rel = 0.0

    def fail(self, msg):
        self.failures.append(msg)


def read_index(index_path, on_disk, report):
    """Validate OUT's index; return (shard paths, index)."""
    try:
        index = json.loads(index_path.read_text())  # dicts keep the file's key order
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise Broken(f"{index_path}: unreadable index: {e!r}") from e
    if list(weight_map) != sorted(weight_map):
        report.fail(f"{index_path}: weight_map keys are not sorted")
    names = sorted(set(weight_map.values()))
    expected = [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    if names != expected:
        # Also catches "../x" and absolute names, which must not be opened.
        raise Broken(f"{index_path}: shards {names}, expected {expected}")
    if on_disk != names:
        report.fail(f"{index_path.parent}: shard files on disk {on_disk}, index names {names}")
    for name in names:
        path = index_path.parent / name
        if path.is_symlink() or not path.is_file():
            raise Broken(f"{path}: missing or not a regular file")
    return [index_path.parent / name for name in names], index


def open_output(out, report):
    """Validate OUT's weight files (and index); return its catalog."""
    single, index_path = out / SINGLE_NAME, out / INDEX_NAME
    on_disk = sorted(p.name for p in out.iterdir() if SHARD_RE.fullmatch(p.name))
    index = None
    if index_path.exists():
        if single.exists():
            report.fail(f"{out}: both {SINGLE_NAME} and {INDEX_NAME}")
        files, index = read_index(index_path, on_disk, report)
    elif single.exists():
        if on_disk:
            report.fail(f"{out}: shard files {on_disk} beside {SINGLE_NAME} and no index")
        files = [single]
    else:
        raise Broken(f"{out}: no {SINGLE_NAME} or {INDEX_NAME}")
    try:
        tensors = catalog(files)
    except BadFiles as e:
        raise Broken(str(e)) from e
    if index is not None:
        weight_map = index["weight_map"]
        for name, t in tensors.items():
            if weight_map.get(name) != t.path.name:
                report.fail(f"{index_path}: {name} -> {weight_map.get(name)}, "
                            f"but it is in {t.path.name}")
        for name in sorted(set(weight_map) - set(tensors)):
            report.fail(f"{index_path}: {name} is in no shard")
        total = index.get("metadata", {}).get("total_size")
        data_bytes = sum(t.nbytes for t in tensors.values())
        if total != data_bytes:
            report.fail(f"{index_path}: total_size {total}, tensors hold {data_bytes} bytes")
    for path in files:
        fmt = read_header(path).get("__metadata__", {}).get("format")
        if fmt != "pt":
            report.fail(f"{path}: __metadata__.format is {fmt!r}, expected 'pt'")
    return tensors


# Extra absolute tolerance, as a multiple of n * max|x_i|, for results computed by running
# sums (pmad's daemon): an f32 sum of terms that cancel keeps about 2^-24 * max|x_i| of
# rounding residue per term, which is far below an ulp of the inputs but can be many ulps of a
# result that is (nearly) zero. Set by --accumulator-tolerance f32; 0 for one-shot merges.
ACC_EPS = 0.0
F32_WITHIN_MEAN = False


def check_float(name, dtype, got, inputs, weights, report):
    """Compare one float output tensor (safetensors dtype `dtype`) with the float64 mean."""
    xs = [x.astype(np.float64) for x in inputs]
    with np.errstate(invalid="ignore", over="ignore"):
        # asarray: for 0-rank tensors numpy arithmetic returns scalars, not arrays.
        mean = np.asarray(sum(w * x for w, x in zip(weights, xs, strict=True)))
    want = round_to(mean, dtype)
    got_nan, want_nan = np.isnan(got.astype(np.float64)), np.isnan(want.astype(np.float64))
    bad = got_nan != want_nan
    both = ~got_nan & ~want_nan
    if dtype in ULP_DTYPES:
        diff = np.abs(ordinal(got) - ordinal(want))
        # The float64 mean has its own rounding error (the weights, e.g. 1/3, are inexact):
        # about n * eps64 * max|x_i|. Where inputs cancel exactly, m can be a tiny nonzero
        # artefact (2.7e-20 for a true 0); a result within that bound of m is not a mismatch.
        with np.errstate(invalid="ignore", over="ignore"):
            scale = np.zeros_like(mean, dtype=np.float64)
            for x in xs:
                scale = np.maximum(scale, np.abs(x))
            own_error = (8 * np.finfo(np.float64).eps + ACC_EPS) * len(xs) * scale
            indistinct = np.abs(got.astype(np.float64) - mean) <= own_error
        bad |= both & (diff > 1) & ~indistinct
        if both.any():
            report.max_ulp[dtype] = max(report.max_ulp[dtype], int(diff[both].max()))
    else:
        g = got.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            inf_ok = np.isinf(want) & (g == want)
            magnitude = np.maximum(np.abs(mean), TINY)
            for x in xs:
                magnitude = np.maximum(magnitude, np.abs(x))
            if F32_WITHIN_MEAN:
                # Relative to m itself, beyond the float64 mean's own error bound.
                own_error = 8 * np.finfo(np.float64).eps * len(xs) * magnitude
                excess = np.maximum(np.abs(g - mean) - own_error, 0.0)
                rel = np.where(inf_ok, 0.0, excess / np.maximum(np.abs(mean), TINY))
            else:
                rel = np.where(inf_ok, 0.0, np.abs(g - mean) / magnitude)
        rel = np.where(np.isnan(rel), np.inf, rel)  # inf - inf: a wrong infinity
        bad |= both & (rel > REL_TOL)
        if both.any():
            report.max_rel = max(report.max_rel, float(rel[both].max()))
    for flat in np.flatnonzero(bad)[:PER_TENSOR]:
        at = np.unravel_index(flat, got.shape)
        report.fail(f"{name}{list(map(int, at))}: got {float(got[at])!r}, expected "
                    f"{float(want[at])!r} (float64 mean {float(mean[at])!r}; inputs "
                    f"{[float(x[at]) for x in inputs]})")
    if bad.sum() > PER_TENSOR:
        report.fail(f"{name}: {int(bad.sum())} mismatching elements in all")


def check_tensors(out_tensors, ins, weights, requested, report):
    newest = ins[-1]
    if set(out_tensors) != set(newest):
        report.fail(f"tensor names differ: missing {sorted(set(newest) - set(out_tensors))}, "
                    f"extra {sorted(set(out_tensors) - set(newest))}")
    for name in sorted(set(out_tensors) & set(newest)):
        src, dst = newest[name], out_tensors[name]
        report.tensors += 1
        report.elements += int(np.prod(src.shape, dtype=np.int64))
        if dst.shape != src.shape:
            report.fail(f"{name}: shape {list(dst.shape)}, inputs have {list(src.shape)}")
            continue
        if src.dtype in FLOAT_DTYPES:
            want_dtype = src.dtype if requested == "source" else REQUESTED[requested]
            if dst.dtype != want_dtype:
                report.fail(f"{name}: dtype {dst.dtype}, expected {want_dtype}")
                continue
            check_float(name, dst.dtype, dst.load(), [cat[name].load() for cat in ins],
                        weights, report)
        elif dst.dtype != src.dtype or dst.load().tobytes() != src.load().tobytes():
            report.fail(f"{name}: {dst.dtype} tensor differs from the newest input's "
                        f"({src.dtype}), from which it must be copied")


def check_merge_json(out, method, weights, report, shape=None, final_lr_ratio=0.0):
    path = out / "merge.json"
    if not path.exists():
        report.fail(f"{path}: missing")
        return
    info = json.loads(path.read_text())
    if info.get("method") != method:
        report.fail(f"{path}: method {info.get('method')!r}, expected {method!r}")
    if method == "schedule" and (info.get("shape") != shape
                                 or abs(info.get("final_lr_ratio", -1) - final_lr_ratio) > 1e-12):
        report.fail(f"{path}: shape {info.get('shape')!r} final_lr_ratio "
                    f"{info.get('final_lr_ratio')!r}, expected {shape!r} {final_lr_ratio!r}")
    got = info.get("weights")
    numbers = isinstance(got, list) and all(
        isinstance(g, (int, float)) and not isinstance(g, bool) for g in got)
    if (not numbers or len(got) != len(weights)
            or any(abs(g - w) > WEIGHT_TOL for g, w in zip(got, weights, strict=True))):
        report.fail(f"{path}: weights {got}, expected {weights}")


def check_side_files(out, newest, report):
    src = Path(newest)
    if src.is_dir():
        for name in COPIED:
            if (src / name).exists() and (
                    not (out / name).is_file()
                    or (out / name).read_bytes() != (src / name).read_bytes()):
                report.fail(f"{out / name}: not a copy of {src / name}")
    for p in out.iterdir():
        if NEVER_COPIED.fullmatch(p.name):
            report.fail(f"{p}: training-only file copied into the output")


def check_inputs(ckpts, ins):
    first = ins[0]
    for ckpt, cat in zip(ckpts, ins, strict=True):
        if set(cat) != set(first):
            raise Unusable(f"{ckpt}: tensor names differ from {ckpts[0]}")
        for name, t in cat.items():
            if (t.shape, t.dtype) != (first[name].shape, first[name].dtype):
                raise Unusable(f"{ckpt}: {name} is {t.dtype}{list(t.shape)}, "
                               f"{first[name].dtype}{list(first[name].shape)} in {ckpts[0]}")
            if t.dtype not in FLOAT_DTYPES and t.dtype not in INT_DTYPES:
                raise Unusable(f"{ckpt}: {name} has dtype {t.dtype}, which the oracle cannot check")


def check(args):
    global ACC_EPS, F32_WITHIN_MEAN
    ACC_EPS = 4 * 2.0**-24 if args.accumulator_tolerance == "f32" else 0.0
    F32_WITHIN_MEAN = args.f32_within == "mean"
    n = len(args.ckpt)
    weights = merge_weights(args.method, n, args.alpha, args.weights, args.shape,
                            args.final_lr_ratio)
    ins = [open_input(c) for c in args.ckpt]
    check_inputs(args.ckpt, ins)
    out = Path(args.out)
    if not out.is_dir():
        raise Unusable(f"{out}: not a directory")

    report = Report()
    try:
        out_tensors = open_output(out, report)
    except Broken as e:
        report.fail(str(e))
    else:
        check_tensors(out_tensors, ins, weights, args.dtype, report)
    check_merge_json(out, args.method, weights, report, args.shape, args.final_lr_ratio)
    check_side_files(out, args.ckpt[-1], report)

    if report.failures:
        for msg in report.failures[:MAX_REPORTED]:
            print(f"oracle: MISMATCH {msg}")
        if len(report.failures) > MAX_REPORTED:
            print(f"oracle: ... {len(report.failures) - MAX_REPORTED} more")
        return 1
    print(f"oracle: {report.tensors} tensors, {report.elements} elements checked, "
          f"max bf16 ulp diff {report.max_ulp['BF16']}, max f16 ulp diff {report.max_ulp['F16']}, "
          f"max f32 rel err {report.max_rel:.3g} ({args.method}, n={n}, out {out})")
    return 0


def weight_list(text):
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from e


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="check a pmad merge output against the inputs")
    chk.add_argument("--method", required=True,
                     choices=["sma", "wma", "ema", "weights", "schedule"])
    chk.add_argument("--alpha", type=float)
    chk.add_argument("--shape", choices=sorted(SHAPES))
    chk.add_argument("--final-lr-ratio", type=float, default=0.0)
    chk.add_argument("--f32-within", choices=["inputs", "mean"], default="inputs",
                     help="f32/f64 outputs within 1e-6 relative to the inputs' magnitude "
                          "(default) or to the mean itself")
    chk.add_argument("--weights", type=weight_list, help="comma-separated, oldest first")
    chk.add_argument("--dtype", default="source", choices=["source", "bf16", "f16", "f32"])
    chk.add_argument("--accumulator-tolerance", choices=["none", "f32"], default="none",
                     help="also accept bf16/f16 results within 4 n 2^-24 max|x_i| of the mean "
                          "(the error bound of an f32 running sum where inputs cancel)")
    chk.add_argument("out", metavar="OUT")
    chk.add_argument("ckpt", metavar="CKPT", nargs="+", help="inputs, oldest first")
    args = parser.parse_args()
    try:
        sys.exit(check(args))
    except Unusable as e:
        print(f"oracle: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # an oracle bug must not read as a verdict on pmad
        traceback.print_exc()
        sys.exit(3)


if __name__ == "__main__":
    main()
