"""Pre-train a tiny torchtitan-style Llama at a constant LR, checkpointing the torchtitan way.

The corpus is the Python standard library's own source, byte-level (data.py: the hf-trainer
example's, so both examples train and score on the same split): nothing is downloaded. The model
and the checkpoint state dict are in model.py. Every --save-every steps, and at the last step,
the full training state is written with

    torch.distributed.checkpoint.save(state, checkpoint_id=f"{output_dir}/checkpoint/step-{N}", no_dist=True)

(torchtitan's `{dump_folder}/checkpoint/step-N/`: `__0_0.distcp`, then `.metadata` last), and
only the newest --keep step directories are kept (torchtitan's `keep_latest_k`). That folder
is what pmad watches (`layout = "torchtitan"`).

Schedule: linear warmup for --warmup-steps, then a constant LR (a `LambdaLR`, like
torchtitan's): the stable phase of a warmup-stable-decay run, where averaging pays off.

    python train.py --output-dir run/output --max-steps 1500

Restart from a checkpoint or from a pmad output (PMA-init): the model, optimizer, LR
scheduler, data position and step all come from the DCP directory (a pmad output carries the
averaged weights and the newest input's optimizer/scheduler/data/step state):

    python train.py --output-dir run/resume --max-steps 1550 --resume-from run/merged/sma8/step-1500
"""

import argparse
import json
import os
import shutil
import time

import torch

import data
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(HERE, "run", "output"), help="dump folder; checkpoints go to <dir>/checkpoint/step-N")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint interval (torchtitan's checkpoint.interval)")
    p.add_argument("--keep", type=int, default=10, help="keep the newest K step directories, 0 = all (torchtitan's keep_latest_k)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (torchtitan's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=384)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=10)
    # One thread is the fastest for a model this small, and leaves the other core to pmad.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--resume-from", help="load model, optimizer, LR scheduler, data position and step from this DCP directory")
    p.add_argument("--eval", action="store_true", help="with --resume-from: validation loss before and after training")
    p.add_argument("--eval-blocks", type=int, default=0, help="score this many held-out blocks with --eval (0 = all)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.time()
    train_tokens, val_tokens, info = data.load_split()
    train_ds = data.BlockDataset(train_tokens, args.block_size)
    print(
        f"corpus: {info['stdlib']}: {info['train_files']} train files ({info['train_bytes'] / 1e6:.1f} MB, "
        f"{len(train_ds)} blocks of {args.block_size}), {info['val_files']} validation files "
        f"({info['val_bytes'] / 1e6:.2f} MB); loaded in {time.time() - t0:.1f}s",
        flush=True,
    )

    model_args = {
        "vocab_size": data.VOCAB_SIZE,
        "dim": args.dim,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "ffn_hidden": args.ffn_hidden,
        "max_seq_len": args.block_size,
    }
    model = M.build(model_args)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model: torchtitan-style Llama, {args.layers} layers, dim {args.dim}, ffn {args.ffn_hidden}, "
          f"vocab {data.VOCAB_SIZE}, {n_params / 1e6:.3f}M parameters (float32)", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=args.weight_decay)
    warmup = args.warmup_steps
    # torchtitan's linear_warmup_stable_decay without the decay: the multiplier is a function
    # of the scheduler's step count, which the checkpoint restores.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    sampler = M.Sampler(len(train_ds), args.batch_size, args.seed)

    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "model_args.json"), "w") as fh:
        json.dump(model_args, fh, indent=2)

    step, ntokens = 0, 0
    resumed = None
    if args.resume_from:
        t = time.time()
        step, ntokens = M.load_training_state(args.resume_from, model, optimizer, scheduler, sampler)
        resumed = {"from": args.resume_from, "step": step, "lr": scheduler.get_last_lr()[0]}
        print(f"resumed: {args.resume_from}: step {step}, {ntokens} tokens seen, lr {resumed['lr']:.2e}, "
              f"data epoch {sampler.epoch} position {sampler.pos}; loaded in {time.time() - t:.1f}s", flush=True)
        if args.eval:
            resumed["val_loss_before"], n = data.val_loss(model, M.loss_fn, val_tokens, args.block_size, args.eval_blocks)
            print(f"resumed: validation loss before training {resumed['val_loss_before']:.4f} ({n} bytes)", flush=True)

    # One JSON line per step; a fresh run starts the file over, a resumed one appends to it.
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume_from else "w")
    first_step = step + 1
    t_train = time.time()
    t_save = 0.0
    window = []
    while step < args.max_steps:
        step += 1
        batch = [train_ds[int(i)] for i in sampler.next_indices()]
        x = torch.stack([b["input_ids"] for b in batch])
        y = torch.stack([b["labels"] for b in batch])
        loss = M.loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        ntokens += x.numel()
        window.append(loss.item())
        metrics.write(json.dumps({"step": step, "loss": round(window[-1], 5), "lr": lr}) + "\n")
        if step % args.log_every == 0 or step == first_step:
            print(f"step: {step:5d}  loss: {sum(window) / len(window):.4f}  grad_norm: {grad_norm.item():.3f}  "
                  f"lr: {lr:.2e}  ({(time.time() - t_train) / (step - first_step + 1):.3f}s/step)", flush=True)
            window = []
        if step % args.save_every == 0 or step == args.max_steps:
            t = time.time()
            path = os.path.join(ckpt_dir, f"step-{step}")
            M.save(path, M.training_state(model, optimizer, scheduler, sampler, step, ntokens))
            purge(ckpt_dir, args.keep)
            t_save += time.time() - t
            print(f"checkpoint: saved {path} in {time.time() - t:.2f}s", flush=True)
    metrics.close()
    took = time.time() - t_train
    n_steps = step - first_step + 1
    print(f"training: {n_steps} steps in {took:.0f}s ({took / max(1, n_steps):.2f}s/step, of which checkpointing {t_save:.1f}s)", flush=True)

    summary = {"max_steps": args.max_steps, "steps": n_steps, "seconds": round(took, 1), "checkpoint_seconds": round(t_save, 1),
               "params": n_params, "torch": torch.__version__, **info}
    if resumed:
        if args.eval:
            resumed["val_loss_after"], n = data.val_loss(model, M.loss_fn, val_tokens, args.block_size, args.eval_blocks)
            print(f"resumed: validation loss after {n_steps} steps {resumed['val_loss_after']:.4f} ({n} bytes)", flush=True)
        summary["resumed"] = resumed
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)


def purge(ckpt_dir, keep):
    """torchtitan's keep_latest_k: delete all but the newest `keep` complete step directories."""
    if keep <= 0:
        return
    steps = sorted(
        int(n[len("step-"):])
        for n in os.listdir(ckpt_dir)
        if n.startswith("step-") and n[len("step-"):].isdigit() and os.path.exists(os.path.join(ckpt_dir, n, ".metadata"))
    )
    for s in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, f"step-{s}"), ignore_errors=True)


if __name__ == "__main__":
    main()
