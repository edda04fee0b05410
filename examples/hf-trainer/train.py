"""Pre-train a tiny byte-level causal LM with the Hugging Face Trainer, at a constant LR.

The corpus is the Python standard library's own source (see data.py): nothing is downloaded.
The model config is built here (no tokenizer, no hub). The Trainer writes
`<output_dir>/checkpoint-<step>/` every --save-steps steps (model.safetensors, config.json,
optimizer.pt, ..., trainer_state.json last) -- exactly what pmad watches.

Schedule: linear warmup for --warmup-steps, then a constant LR (`constant_with_warmup`): the
stable phase of a warmup-stable-decay run, where averaging checkpoints pays off.

    python train.py --output-dir run/output --max-steps 2000

A real LR-decay fork (decay.sh): resume the same run from a constant-LR checkpoint and decay the
LR from --decay-start to --max-steps with --decay-shape (the "D" of warmup-stable-decay). The
Trainer restores the optimizer, RNG and data position, so the fork sees the same batches as
the constant-LR run did over those steps:

    python train.py --output-dir run/decay/linear --max-steps 2000 \
        --resume-from run/output/checkpoint-1500 --decay-start 1500 --decay-shape linear
"""

import argparse
import json
import math
import os
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

import data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "run", "output"))
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    # One thread is the fastest for a model this small: its ops are tiny, and with two threads
    # OpenMP barriers stall whenever anything else (pmad, a build) wants a core.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--resume-from", help="resume from this checkpoint-<step> directory")
    p.add_argument("--decay-start", type=int, default=0, help="decay the LR from this step to --max-steps (0 = never)")
    p.add_argument("--decay-shape", default="linear", choices=["linear", "cosine", "minus_sqrt"])
    p.add_argument("--final-lr-ratio", type=float, default=0.0, help="the decay's final LR as a fraction of --lr")
    args = p.parse_args()

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per save
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)

    t0 = time.time()
    train_tokens, val_tokens, info = data.load_split()
    train_ds = data.BlockDataset(train_tokens, args.block_size)
    print(
        f"corpus: {info['stdlib']}: {info['train_files']} train files ({info['train_bytes'] / 1e6:.1f} MB, "
        f"{len(train_ds)} blocks of {args.block_size}), {info['val_files']} validation files "
        f"({info['val_bytes'] / 1e6:.2f} MB); loaded in {time.time() - t0:.1f}s",
        flush=True,
    )

    config = LlamaConfig(
        vocab_size=data.VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(256, args.block_size),
        tie_word_embeddings=True,
        bos_token_id=data.BOS,
        eos_token_id=data.EOS,
        pad_token_id=data.PAD,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, vocab {data.VOCAB_SIZE}, {n_params / 1e6:.3f}M parameters", flush=True)

    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=None,  # keep every checkpoint: pmad reads them, eval.py compares
        save_only_model=False,  # a real run also writes optimizer/scheduler state
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer_cls = Trainer
    if args.decay_start:
        trainer_cls = decay_trainer(args)
        print(f"schedule: {args.decay_shape} decay from step {args.decay_start} to {args.max_steps} (final LR ratio {args.final_lr_ratio:g})", flush=True)
    trainer = trainer_cls(model=model, args=targs, train_dataset=train_ds)
    t1 = time.time()
    trainer.train(resume_from_checkpoint=args.resume_from)
    took = time.time() - t1
    print(f"training: {args.max_steps} steps in {took:.0f}s ({took / args.max_steps:.2f}s/step)", flush=True)
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as fh:
        json.dump(
            {
                "max_steps": args.max_steps,
                "seconds": round(took, 1),
                "params": n_params,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                **info,
            },
            fh,
            indent=2,
        )


def decay_trainer(args):
    """A Trainer whose LR follows constant_with_warmup, then decays from --decay-start.

    The multiplier is a function of the absolute step, so resuming (which restores the
    scheduler's step count, not its function) continues it exactly."""
    length = args.max_steps - args.decay_start
    shapes = {
        "linear": lambda x: 1.0 - x,
        "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
        "minus_sqrt": lambda x: 1.0 - math.sqrt(x),
    }
    f = shapes[args.decay_shape]
    r = args.final_lr_ratio

    def multiplier(step):
        if step < args.warmup_steps:
            return step / max(1, args.warmup_steps)
        if step < args.decay_start:
            return 1.0
        x = min(1.0, (step - args.decay_start) / length)
        return r + (1.0 - r) * f(x)

    class DecayTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            return self.lr_scheduler

    return DecayTrainer


if __name__ == "__main__":
    main()
