"""What bench/peers/dcp_torch_avg.py and dcp_check.py share: which DCP keys are averaged, and a
state dict of empty tensors built from a checkpoint's `.metadata`."""
import warnings

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

# pmad's default split (docs/formats.md, "What is averaged"): keys of training state are
# copied from the newest checkpoint, every other floating-point tensor is averaged. Megatron's
# fp32 master weights are the exception: averaged with the weights.
COPIED_PREFIXES = (
    "optimizer.", "optim.", "lr_scheduler.", "dataloader.", "train_state", "train.",
    "rng_state", "rerun_state_machine", "common_state",
)
AVERAGED_EXCEPTIONS = ("optimizer.state.fp32_param.",)

# dcp.load/save without a process group warn once per call that they assume one process.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")


def averaged(fqn, dtype):
    """Whether a merge averages the tensor at flattened key `fqn` (dtype: its torch dtype)."""
    if not dtype.is_floating_point:
        return False
    return fqn.startswith(AVERAGED_EXCEPTIONS) or not fqn.startswith(COPIED_PREFIXES)


def acc_dtype(dtype):
    """The accumulator: f32 for 16-bit (and 8-bit) inputs, f64 for f32 and f64 inputs."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def metadata(ckpt):
    return FileSystemReader(ckpt).read_metadata()


def flat_template(md, keys=None):
    """{fqn: empty tensor of the saved dtype and global shape, or None for a bytes item} for
    every key of `md` (or only `keys`). dcp.load matches by flattened key, fills the tensors in
    place and replaces the Nones with the loaded objects."""
    out = {}
    for fqn, m in md.state_dict_metadata.items():
        if keys is not None and fqn not in keys:
            continue
        if isinstance(m, TensorStorageMetadata):
            out[fqn] = torch.empty(m.size, dtype=m.properties.dtype)
        else:
            out[fqn] = None
    return out


def tensor_dtypes(md):
    return {
        fqn: m.properties.dtype
        for fqn, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def unflatten(flat, md):
    """The nested state dict the checkpoint was saved from (md.planner_data holds each key's
    path; integer steps are list indexes), so a save writes the same keys and paths."""
    root = {}
    for fqn, value in flat.items():
        path = md.planner_data.get(fqn, (fqn,))
        cur = root
        for i, p in enumerate(path):
            last = i == len(path) - 1
            new = value if last else ([] if isinstance(path[i + 1], int) else {})
            if isinstance(cur, list):
                while len(cur) <= p:
                    cur.append(None)
                if last or cur[p] is None:
                    cur[p] = new
                cur = cur[p]
            else:
                if last or p not in cur:
                    cur[p] = new
                cur = cur[p]
    return root


def flatten(nested, prefix=""):
    """The inverse of unflatten for nested dicts and lists: {"a.b.0.c": value}."""
    out = {}
    items = nested.items() if isinstance(nested, dict) else enumerate(nested)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
