"""The hf-trainer example's corpus, shared so both examples train and score on the same split.

../hf-trainer/data.py reads the `.py` files of the Python standard library as bytes (nothing is
downloaded) and holds out about 5% of the files, by a hash of their path, for validation. It
is loaded by path under another module name (both files are called data.py) and re-exported
here, plus the validation loss both train.py and eval.py report.
"""

import importlib.util
import os

import torch

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hf-trainer", "data.py")
_spec = importlib.util.spec_from_file_location("hf_trainer_data", _PATH)
_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hf)

load_split = _hf.load_split
BlockDataset = _hf.BlockDataset
VOCAB_SIZE = _hf.VOCAB_SIZE


def val_loss(model, loss_fn, val_tokens, block_size, max_blocks=0, batch_size=64):
    """Validation loss in nats per byte over the first max_blocks held-out blocks (0 = all),
    and the number of bytes scored (file-boundary tokens are not scored)."""
    ds = BlockDataset(val_tokens, block_size, max_blocks or None)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(b, min(b + batch_size, len(ds)))]
            x = torch.stack([it["input_ids"] for it in items])
            y = torch.stack([it["labels"] for it in items])
            n = int((y[:, 1:] != -100).sum())
            total += loss_fn(model, x, y).item() * n
            count += n
    model.train(was_training)
    return total / count, count
