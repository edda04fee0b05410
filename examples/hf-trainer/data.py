"""Byte-level corpus from the Python standard library's own sources (no download).

Shared by train.py and eval.py so both see the same split. Every `.py` file under the
stdlib directory (site-packages and the test suites excluded) is read as bytes; files are
split into train / validation *by file* with a stable hash of the relative path, so the
validation text comes from files the model never trained on.

Tokens: bytes 0..255, plus BOS = 256 (start of a file) and EOS = 257 (end of a file).
PAD = 258 is never in the data; it only fills the embedding table.
"""

import hashlib
import os
import sysconfig

import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root), full))
    return root, out


def is_validation(rel_path, val_percent):
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "little")
    return h % 100 < val_percent


def load_split(val_percent=5):
    """Return (train_tokens, val_tokens, info) as 1-D int64 tensors."""
    root, files = stdlib_files()
    train, val = bytearray(), bytearray()
    n_train = n_val = 0
    # Bytes are 0..255, so BOS/EOS cannot live in the byte buffer: remember where each file
    # starts in the token stream (each earlier file added two markers) and insert them later.
    train_marks, val_marks = [], []
    for rel, full in files:
        try:
            with open(full, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if not data:
            continue
        if is_validation(rel, val_percent):
            buf, marks = val, val_marks
            n_val += 1
        else:
            buf, marks = train, train_marks
            n_train += 1
        marks.append((len(buf) + 2 * (len(marks)), len(data)))
        buf.extend(data)

    def to_tokens(buf, marks):
        t = torch.empty(len(buf) + 2 * len(marks), dtype=torch.int64)
        src = torch.frombuffer(buf, dtype=torch.uint8).to(torch.int64)
        off = 0
        for start, n in marks:
            t[start] = BOS
            t[start + 1 : start + 1 + n] = src[off : off + n]
            t[start + 1 + n] = EOS
            off += n
        return t

    info = {
        "stdlib": root,
        "train_files": n_train,
        "val_files": n_val,
        "train_bytes": len(train),
        "val_bytes": len(val),
    }
    return to_tokens(train, train_marks), to_tokens(val, val_marks), info


class BlockDataset(torch.utils.data.Dataset):
    """Contiguous blocks of `block_size` tokens; labels = inputs (HF shifts them inside the model)."""

    def __init__(self, tokens, block_size, max_blocks=None):
        self.tokens = tokens
        self.block_size = block_size
        self.n = (len(tokens) - 1) // block_size
        if max_blocks is not None:
            self.n = min(self.n, max_blocks)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = self.tokens[i * self.block_size : (i + 1) * self.block_size]
        labels = x.clone()
        # Never ask the model to predict a file boundary token: the loss is purely nats per byte.
        labels[(labels == BOS) | (labels == EOS)] = -100
        return {"input_ids": x, "labels": labels}
