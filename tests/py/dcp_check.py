"""An independent reader of PyTorch DCP checkpoints, without torch, for pmad's tests.

    python dcp_check.py check OUT EXPECTED.safetensors NEWEST_INPUT [COPIED_KEYS]
    python dcp_check.py sma OUT EXPECTED.safetensors INPUT...
    python dcp_check.py keys CKPT

It shares nothing with pmad's Rust reader: `.metadata` and each item's `data.pkl` are read by
Python's own unpickler, with every class replaced by an inert stand-in (nothing is imported or
executed); items are read with Python's `zipfile`, which checks every entry's CRC32; values
with numpy (ml_dtypes for bfloat16).

`check` verifies a pmad output OUT:
- `.metadata` is byte for byte the newest input's;
- every item of every data file passes zipfile's CRC32 check;
- every key in EXPECTED (float64 averages, full shapes) reassembled from OUT's chunks is within
  1 ulp of its dtype (bf16, f16) or 1e-6 (f32, f64; relative above 1) of the expected value;
- every other item is byte for byte the newest input's item of the same key and chunk;
  COPIED_KEYS (comma-separated) are taken out of EXPECTED first: keys excluded from averaging.
Prints one line of counts; exits 1 naming the first difference.

`sma` is `check` against the plain average of INPUT... (oldest first, the last one the
newest), computed here in float64 from the inputs; EXPECTED only names the averaged keys.
"""

import io
import json
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}
STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class Stub:
    """An instance of a class named by the pickle: its name, arguments and state."""

    def __init__(self, name, args=()):
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state):
        self.state = state

    def field(self, key):
        s = self.state
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], dict):
            s = {**(s[0] or {}), **s[1]}
        return s.get(key) if isinstance(s, dict) else None

    def __hash__(self):
        return id(self)


def stub_class(module, name):
    if module == "torch" and name == "Size":
        return lambda t: tuple(t)
    if module == "torch" and (name in DTYPES or name.endswith("Storage")):
        return name

    class C(Stub):
        def __new__(cls, *args):
            o = object.__new__(cls)
            Stub.__init__(o, f"{module}.{name}", args)
            return o

        def __init__(self, *args):
            pass

    C.__name__ = name
    return C


class Reader(pickle.Unpickler):
    def find_class(self, module, name):
        return stub_class(module, name)

    def persistent_load(self, pid):
        return pid


def unpickle(b):
    return Reader(io.BytesIO(b)).load()


def metadata(ckpt):
    with open(f"{ckpt}/.metadata", "rb") as f:
        raw = f.read()
    m = unpickle(raw)
    sd = m.field("state_dict_metadata")
    items = {}
    for k, v in m.field("storage_data").items():
        off = k.field("offset")
        items[(k.field("fqn"), tuple(off) if off is not None else None)] = (
            v.field("relative_path"),
            v.field("offset"),
            v.field("length"),
        )
    return raw, sd, items


def item_bytes(ckpt, where):
    file, at, length = where
    with open(f"{ckpt}/{file}", "rb") as f:
        f.seek(at)
        return f.read(length)


def chunk_array(item):
    """The chunk an item holds, as a numpy array in its logical shape."""
    z = zipfile.ZipFile(io.BytesIO(item))
    bad = z.testzip()
    if bad is not None:
        raise SystemExit(f"entry {bad} fails its CRC32 check")
    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    r = unpickle(z.read(pkl))
    if not isinstance(r, Stub) or r.name != "torch._utils._rebuild_tensor_v2":
        raise SystemExit(f"not a plain tensor item: {getattr(r, 'name', r)!r}")
    pid, offset, size, stride = r.args[:4]
    dt = np.dtype(DTYPES[STORAGES[pid[1]]])
    storage = np.frombuffer(z.read(f"{prefix}data/{pid[2]}"), dtype=dt)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * dt.itemsize for s in stride]
    )
    return np.array(view)


def ulp(want, dt):
    """One unit in the last place of `want` in dtype `dt` (bf16: 7 fraction bits, f16: 10)."""
    frac, tiny = {np.dtype(ml_dtypes.bfloat16): (7, 2.0**-133), np.dtype(np.float16): (10, 2.0**-24)}[
        np.dtype(dt)
    ]
    a = np.abs(want)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.maximum(2.0 ** (e - frac), tiny)


def assembled(ckpt, keys):
    """The full float64 value of each of `keys`, reassembled from the checkpoint's chunks."""
    _, sd, items = metadata(ckpt)
    full = {k: np.zeros(tuple(sd[k].field("size")), dtype=np.float64) for k in keys}
    for (fqn, off), where in items.items():
        if fqn in full:
            arr = chunk_array(item_bytes(ckpt, where))
            full[fqn][tuple(slice(o, o + n) for o, n in zip(off, arr.shape))] = arr
    return full


def sma(out, expected_path, *inputs):
    keys = list(load_file(expected_path))
    vals = [assembled(c, keys) for c in inputs]
    want = {k: sum(v[k] for v in vals) / len(vals) for k in keys}
    check(out, want, inputs[-1])


def check(out, expected_path, newest, copied=""):
    raw_o, sd, items_o = metadata(out)
    raw_n, _, items_n = metadata(newest)
    if raw_o != raw_n:
        raise SystemExit(".metadata differs from the newest input's")
    expected = load_file(expected_path) if isinstance(expected_path, str) else expected_path
    for k in filter(None, copied.split(",")):
        del expected[k]
    full = {}
    for (fqn, off), where in items_o.items():
        item = item_bytes(out, where)
        z = zipfile.ZipFile(io.BytesIO(item))
        bad = z.testzip()
        if bad is not None:
            raise SystemExit(f"{fqn} {off}: entry {bad} fails its CRC32 check")
        if fqn in expected:
            meta = sd[fqn]
            if fqn not in full:
                props = meta.field("properties")
                dtype = props.state[0] if isinstance(props.state, tuple) else props.field("dtype")
                full[fqn] = (np.zeros(tuple(meta.field("size")), dtype=np.float64), dtype, [])
            arr = chunk_array(item)
            sl = tuple(slice(o, o + s) for o, s in zip(off, arr.shape))
            full[fqn][0][sl] = arr.astype(np.float64)
            full[fqn][2].append(arr.dtype)
        elif item != item_bytes(newest, items_n[(fqn, off)]):
            raise SystemExit(f"{fqn} {off}: copied item differs from the newest input's")
    if set(full) != set(expected):
        raise SystemExit(f"averaged keys {sorted(full)} != expected {sorted(expected)}")
    for fqn, (got, dtype, dts) in full.items():
        want = expected[fqn]
        dt = dts[0]
        if dt in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
            tol = ulp(want, dt)
        else:
            tol = 1e-6 * np.maximum(np.abs(want), 1.0)
        err = np.abs(got - want)
        if (err > tol).any():
            i = int(np.argmax(err - tol))
            raise SystemExit(
                f"{fqn}: {int((err > tol).sum())} elements off; worst at {i}: "
                f"got {got.flat[i]!r}, want {want.flat[i]!r} ({dtype})"
            )
    print(
        json.dumps(
            {"averaged_keys": len(full), "items": len(items_o), "copied_items": len(items_o) - sum(len(v[2]) for v in full.values())}
        )
    )


def keys(ckpt):
    _, sd, items = metadata(ckpt)
    print(json.dumps({"keys": sorted(sd), "items": len(items)}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"check": check, "sma": sma, "keys": keys}[cmd](*args)
