"""A tiny torchtitan-style Llama in plain torch, and torchtitan's checkpoint state dict.

No torchtitan package is needed. What matters for pmad is that the state dict has the same
keys, dtypes and nesting as torchtitan's:

- model keys at the top level (torchtitan's `ModelWrapper`, flattened by its checkpointer):
  `tok_embeddings.weight`, `layers.{i}.attention.{wq,wk,wv,wo}.weight`,
  `layers.{i}.feed_forward.{w1,w2,w3}.weight`, `layers.{i}.attention_norm.weight`,
  `layers.{i}.ffn_norm.weight`, `norm.weight`, `output.weight`; float32 (torchtitan's default
  for checkpoints; the RoPE table is a non-persistent buffer and is not saved);
- `optimizer`: `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`, as
  torchtitan's `OptimizersContainer.state_dict()` returns it (`state.<fqn>.exp_avg`, ...,
  `param_groups.<fqn>.lr`, ...);
- `lr_scheduler`: the `LambdaLR`'s `state_dict()` (torchtitan's `LRSchedulersContainer`);
- `dataloader`: `{"dp_rank_0": pickled position, "world_size": 1}` (torchtitan's
  `ParallelAwareDataloader` pickles its state into bytes per data-parallel rank);
- `train_state`: `{"step": int32 tensor, "ntokens_seen": int64 tensor}` (torchtitan's
  `TrainState`).

`torch.distributed.checkpoint` flattens the nesting with dots when it saves, so the keys on
disk are `optimizer.state.layers.0.attention.wq.weight.exp_avg`, `train_state.step`, ...:
exactly the prefixes pmad copies instead of averaging.
"""

import math
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_table(head_dim, max_len, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.stack([angles.cos(), angles.sin()])  # [2, max_len, head_dim / 2]


def apply_rope(x, table):
    # x: [batch, heads, seq, head_dim]; rotate pairs (x0, x1), (x2, x3), ... like torchtitan's
    # complex multiplication with freqs_cis.
    cos, sin = table[0, : x.shape[2]], table[1, : x.shape[2]]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, ffn_hidden):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """torchtitan's Llama: layers in a ModuleDict keyed "0", "1", ..., untied output head."""

    def __init__(self, vocab_size, dim, n_layers, n_heads, ffn_hidden, max_seq_len):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(dim, n_heads, ffn_hidden) for i in range(n_layers)})
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope", rope_table(dim // n_heads, max_seq_len), persistent=False)
        self.init_weights(dim, n_layers)

    def init_weights(self, dim, n_layers):
        # torchtitan's scheme: unit-normal embeddings, std 0.02 for q/k/v/w1, a depth-scaled
        # std for the projections back into the residual stream, 1/sqrt(dim) for the head.
        nn.init.normal_(self.tok_embeddings.weight)
        for i, layer in self.layers.items():
            depth_std = 0.02 / math.sqrt(2 * (int(i) + 1))
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                nn.init.trunc_normal_(w.weight, std=0.02)
            for w in (layer.attention.wo, layer.feed_forward.w2, layer.feed_forward.w3):
                nn.init.trunc_normal_(w.weight, std=depth_std)
        s = dim**-0.5
        nn.init.trunc_normal_(self.output.weight, std=s, a=-3 * s, b=3 * s)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope)
        return self.output(self.norm(h))


def build(args):
    """The model from a dict of model arguments (train.py writes them to model_args.json)."""
    return Transformer(
        vocab_size=args["vocab_size"],
        dim=args["dim"],
        n_layers=args["n_layers"],
        n_heads=args["n_heads"],
        ffn_hidden=args["ffn_hidden"],
        max_seq_len=args["max_seq_len"],
    )


def loss_fn(model, x, labels):
    """Mean next-byte cross-entropy (nats per byte); labels -100 (file boundaries) not scored."""
    logits = model(x)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


# -- checkpoint state, torchtitan's way ---------------------------------------------------------


class Sampler:
    """Random order over the training blocks, reshuffled each epoch from (seed, epoch); its
    state is the position, so a resumed run sees exactly the batches the original run would."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = None

    def next_indices(self):
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
            return self.next_indices()
        idx = self._perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self):
        return {"dp_rank_0": pickle.dumps({"epoch": self.epoch, "pos": self.pos}), "world_size": 1}

    def load_state_dict(self, sd):
        s = pickle.loads(sd["dp_rank_0"])
        self.epoch, self.pos, self._perm = s["epoch"], s["pos"], None


def training_state(model, optimizer, scheduler, sampler, step, ntokens):
    """The dict torchtitan's CheckpointManager hands to dcp.save: model keys flattened to the
    top level, the rest under their component names."""
    sd = dict(get_model_state_dict(model))
    sd["optimizer"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_OPTIONS)
    sd["lr_scheduler"] = scheduler.state_dict()
    sd["dataloader"] = sampler.state_dict()
    sd["train_state"] = {
        "step": torch.tensor(step, dtype=torch.int32),
        "ntokens_seen": torch.tensor(ntokens, dtype=torch.int64),
    }
    return sd


class _quiet(warnings.catch_warnings):
    """no_dist=True is the point here (one process, like a one-GPU torchtitan run); torch
    still warns on every save and load that torch.distributed is not initialised."""

    def __enter__(self):
        r = super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return r


def save(path, state):
    with _quiet():
        dcp.save(state, checkpoint_id=path, no_dist=True)


def dcp_load(state, path):
    """dcp.load in place, in one process."""
    with _quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)


def load_training_state(path, model, optimizer, scheduler, sampler):
    """Load everything from a DCP checkpoint (or a pmad output of one) in place, the way
    torchtitan resumes: build the same state dict, dcp.load into it, hand each part back to
    its owner. Returns (step, ntokens_seen)."""
    sd = training_state(model, optimizer, scheduler, sampler, 0, 0)
    dcp_load(sd, path)
    model_sd = {k: v for k, v in sd.items() if k not in ("optimizer", "lr_scheduler", "dataloader", "train_state")}
    set_model_state_dict(model, model_sd)
    set_optimizer_state_dict(model, optimizer, sd["optimizer"], options=OPTIM_OPTIONS)
    scheduler.load_state_dict(sd["lr_scheduler"])
    sampler.load_state_dict(sd["dataloader"])
    return int(sd["train_state"]["step"]), int(sd["train_state"]["ntokens_seen"])


def load_model(path, model):
    """Load only the model weights from a DCP checkpoint (the other keys are left on disk)."""
    sd = dict(get_model_state_dict(model))
    dcp_load(sd, path)
    set_model_state_dict(model, sd)
    return model


def load_everything(path, model_args):
    """Every key of a DCP checkpoint written by train.py (or a pmad output of one), loaded
    with dcp.load into the state dict of a freshly built model and optimizer, flattened to the
    dotted keys DCP stores: {key: tensor or object}."""
    model = build(model_args)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sd = training_state(model, optimizer, scheduler, Sampler(1, 1, 0), 0, 0)
    dcp_load(sd, path)
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        else:
            out[prefix[:-1]] = v

    walk("", sd)
    return out


def saved_keys(path):
    """The keys a DCP checkpoint's .metadata lists."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(path).read_metadata().state_dict_metadata)
