#!/usr/bin/env python
"""Training-quality yardstick: does the framework's default model learn as well as a plain GPT?

Models are trained on the same preprocessed data, with the same recipe and number of steps, and
scored on the same held-out documents (one full pass over the ``valid`` part of ``--split``):

- ``reference``: a plain single-process PyTorch GPT-2 / nanoGPT-style model (bench/reference_gpt.py:
  learned positions, every weight N(0, 0.02), residual projections at 0.02 / sqrt(2L), tied head),
  trained by a plain loop here: ``torch.optim.AdamW``, the same parameter groups and LR schedule;
- ``plain``: the same plain model and loop, but with our default architecture (sinusoidal
  positions, sqrt(d) embedding scale) and our Pre-LN's exact initial weights: it separates what the
  model definition buys from what the trainer does (``plain`` and ``preln`` should agree closely);
- ``preln``: ``pretrain_gpt.py`` with its defaults (the paper's Pre-LN: sinusoidal positions,
  fairseq initialisation);
- ``normformer``: the same with ``--scale-attn --scale-fc --scale-heads --scale-resids``.

Both framework runs go through the real trainer (a subprocess) and save a checkpoint, which is then
scored by the same function as the reference. Batches are the same samples in the same order for
all three (same ``--seed``). Writes ``OUT/quality.json`` and prints one line per model.

    python bench/quality.py                       # demo corpus (make demo), 400 steps, ~5 min on 2 cores
    python bench/quality.py --lr 3e-3 --variants reference,preln
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.data_args import add_data_args, add_model_shape_args, data_flags, vocab_size  # noqa: E402

NORMFORMER_FLAGS = ["--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids"]
VARIANTS = ("reference", "plain", "preln", "normformer")
PLAIN_LOOP = ("reference", "plain")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, mock=False)
    m = add_model_shape_args(p, "model and recipe (both sides)")
    m.add_argument("--iters", type=int, default=400)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--lr-warmup-iters", type=int, default=20)
    m.add_argument("--weight-decay", type=float, default=0.01)
    m.add_argument("--seed", type=int, default=1)
    r = p.add_argument_group("run")
    r.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    r.add_argument("--threads", type=int, default=1, help="torch threads per model")
    r.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "quality"),
                   help="default runs/quality (git-ignored)")
    return p


def datasets(args, train_samples):
    from megatron_normformer.data import build_train_valid_test_datasets

    train, valid, _ = build_train_valid_test_datasets(
        [args.data_path], args.split, args.seq_length, args.seed, [train_samples, None, 0])
    if valid is None:
        raise SystemExit(f"error: --split {args.split} leaves no held-out (valid) documents")
    return train, valid


def launch_framework(args, variant: str, data: List[str]) -> subprocess.Popen:
    """``pretrain_gpt.py`` at its defaults (plus NormFormer's flags), saving a checkpoint."""
    out = os.path.join(args.output_dir, variant)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads),
           "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
           "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters),
           "--lr", str(args.lr), "--min-lr", "0", "--lr-warmup-iters", str(args.lr_warmup_iters),
           "--lr-decay-style", "linear", "--weight-decay", str(args.weight_decay),
           "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", str(args.seed),
           "--num-workers", "0", "--log-interval", str(max(1, args.iters // 8)),
           "--eval-interval", str(args.iters), "--eval-iters", "0",
           "--save", out, "--save-interval", str(args.iters)] + data
    cmd += NORMFORMER_FLAGS if variant == "normformer" else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    from megatron_normformer.testing import free_port

    env["MASTER_PORT"] = str(free_port())  # runs side by side each need their own rendezvous
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(out + ".log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def train_plain(args, variant: str, vocab: int, train) -> "torch.nn.Module":
    """The plain model and loop: the same samples in the same order, the same recipe.
    ``reference``: nanoGPT's model and init; ``plain``: our default model's, weights included."""
    import torch

    from bench.reference_gpt import ReferenceGPT
    from megatron_normformer.config import ModelConfig
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState
    from megatron_normformer.training.engine import param_groups
    from megatron_normformer.training.schedule import LRSchedule

    torch.manual_seed(args.seed)
    shape = dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                 num_attention_heads=args.num_attention_heads, vocab_size=vocab,
                 max_position_embeddings=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0)
    if variant == "reference":
        model = ReferenceGPT(ModelConfig(**shape, position_embedding_type="learned", init_scheme="megatron"))
    else:
        cfg = ModelConfig(**shape)
        model = ReferenceGPT(cfg)
        model.load_state_dict(GPTModel(cfg, SingleProcessState(), seed=args.seed).state_dict())
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, False), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-8)
    schedule = LRSchedule(optimizer, args.lr, 0.0, args.lr_warmup_iters, args.iters, "linear")
    b = args.micro_batch_size
    for it in range(args.iters):
        batch = torch.stack([torch.as_tensor(train[i]["text"]) for i in range(it * b, (it + 1) * b)])
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (it + 1) % max(1, args.iters // 8) == 0:
            print(f"  {variant} iteration {it + 1}/{args.iters}: train loss {loss.item():.4f}", flush=True)
    return model.eval()


def score(model, valid, micro_batch_size: int) -> Dict:
    from megatron_normformer.inference.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, valid, micro_batch_size)


def run(argv=None) -> Dict:
    import torch

    args = build_parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: --variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    data = data_flags(args)
    vocab = vocab_size(args)
    train, valid = datasets(args, args.iters * args.micro_batch_size)
    started = time.time()
    procs = {v: launch_framework(args, v, data) for v in variants if v not in PLAIN_LOOP}
    results = {}
    for v in variants:
        if v in PLAIN_LOOP:
            results[v] = score(train_plain(args, v, vocab, train), valid, args.micro_batch_size)
    from megatron_normformer.checkpoint.inference import build_inference_model

    for v, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"error: {v} failed (exit {proc.returncode}); see "
                             f"{os.path.join(args.output_dir, v)}.log")
        model, _ = build_inference_model(os.path.join(args.output_dir, v))
        results[v] = score(model, valid, args.micro_batch_size)
    from bench.throughput import machine

    out = dict(command=" ".join(["bench/quality.py"] + list(argv if argv is not None else sys.argv[1:])),
               machine=machine(), elapsed_s=time.time() - started,
               recipe=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                           num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size, iters=args.iters, lr=args.lr,
                           warmup=args.lr_warmup_iters, seed=args.seed, split=args.split),
               valid_loss={v: r["loss"] for v, r in results.items()},
               valid_tokens=next(iter(results.values()))["tokens"])
    if "reference" in results:
        out["minus_reference"] = {v: r["loss"] - results["reference"]["loss"]
                                  for v, r in results.items() if v != "reference"}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
        json.dump(out, f, indent=1)
    for v in variants:
        delta = out.get("minus_reference", {}).get(v)
        extra = f"  ({delta:+.4f} vs reference)" if delta is not None else ""
        print(f"{v:10s} valid loss {results[v]['loss']:.4f}  ppl {results[v]['ppl']:.2f}{extra}")
    print(f"{out['valid_tokens']} held-out tokens; {out['elapsed_s']:.0f} s; {out['machine']}")
    return out


if __name__ == "__main__":
    run()
