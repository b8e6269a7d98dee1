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
- ``normformer``: the same with ``--scale-attn --scale-fc --scale-heads --scale-resids``;
- ``llama``: ``pretrain_gpt.py`` with a Llama-style architecture at the same width, depth and heads:
  rotary positions, SwiGLU (Megatron-LM's 2/3 sizing), RMSNorm, no linear biases, grouped-query
  attention with heads / 2 groups, untied output, ``--init-scheme megatron`` at its default std
  (``--llama-init-scheme`` changes it);
- ``llama_normformer``: the same with NormFormer's four operations.

Both framework runs go through the real trainer (a subprocess) and save a checkpoint, which is then
scored by the same function as the reference. Batches are the same samples in the same order for
all (same ``--seed``). Writes ``OUT/quality.json`` and prints one line per model.

``--lrs`` sweeps the peak LR: every chosen variant at each LR (runs ``OUT/VARIANT_lrLR``), at most
``--jobs`` trainings at once; the JSON adds each variant's loss per LR, its best LR and, for each
NormFormer variant whose baseline ran too, the difference of the two at their own best LRs.

    python bench/quality.py                       # demo corpus (make demo), 400 steps, ~5 min on 2 cores
    python bench/quality.py --lr 3e-3 --variants reference,preln
    python bench/quality.py --variants llama,llama_normformer --lrs 1e-3,3e-3,6e-3,1e-2 --jobs 2
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
VARIANTS = ("reference", "plain", "preln", "normformer", "llama", "llama_normformer")
PLAIN_LOOP = ("reference", "plain")
BASELINE = {"normformer": "preln", "llama_normformer": "llama"}  # NormFormer variant -> its baseline


def llama_flags(args) -> List[str]:
    """The Llama-style architecture at the yardstick's shape (rope, SwiGLU, RMSNorm, no biases,
    heads / 2 query groups, untied output)."""
    return ["--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm",
            "--disable-bias-linear", "--group-query-attention",
            "--num-query-groups", str(max(1, args.num_attention_heads // 2)),
            "--untie-embeddings-and-output-weights", "--init-scheme", args.llama_init_scheme]


def variant_flags(args, variant: str) -> List[str]:
    flags = llama_flags(args) if variant.startswith("llama") else []
    return flags + (NORMFORMER_FLAGS if variant in BASELINE else [])


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
    m.add_argument("--lrs", default=None,
                   help="comma-separated peak LRs: every variant at each (replaces --lr)")
    m.add_argument("--llama-init-scheme", default="megatron", choices=("megatron", "fairseq"),
                   help="--init-scheme of the llama variants (default megatron, its default std)")
    r = p.add_argument_group("run")
    r.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    r.add_argument("--threads", type=int, default=1, help="torch threads per model")
    r.add_argument("--jobs", type=int, default=0,
                   help="at most this many framework trainings at once (default 0: all at once)")
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


def launch_framework(args, variant: str, data: List[str], name: str = None,
                     lr: float = None) -> subprocess.Popen:
    """``pretrain_gpt.py`` at its defaults (plus the variant's flags), saving a checkpoint in
    ``OUT/name`` (default: the variant's name)."""
    out = os.path.join(args.output_dir, name or variant)
    lr = args.lr if lr is None else lr
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads),
           "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
           "--micro-batch-size", str(args.micro_batch_size), "--train-iters", str(args.iters),
           "--lr", str(lr), "--min-lr", "0", "--lr-warmup-iters", str(args.lr_warmup_iters),
           "--lr-decay-style", "linear", "--weight-decay", str(args.weight_decay),
           "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", str(args.seed),
           "--num-workers", "0", "--log-interval", str(max(1, args.iters // 8)),
           "--eval-interval", str(args.iters), "--eval-iters", "0",
           "--save", out, "--save-interval", str(args.iters)] + data
    cmd += variant_flags(args, variant)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    from megatron_normformer.testing import free_port

    env["MASTER_PORT"] = str(free_port())  # runs side by side each need their own rendezvous
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(out + ".log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def train_plain(args, variant: str, vocab: int, train, lr: float = None) -> "torch.nn.Module":
    """The plain model and loop: the same samples in the same order, the same recipe.
    ``reference``: nanoGPT's model and init; ``plain``: our default model's, weights included."""
    import torch

    from bench.reference_gpt import ReferenceGPT
    from megatron_normformer.config import ModelConfig
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState
    from megatron_normformer.training.engine import param_groups
    from megatron_normformer.training.schedule import LRSchedule

    lr = args.lr if lr is None else lr
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
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, False), lr=lr,
                                  betas=(0.9, 0.98), eps=1e-8)
    schedule = LRSchedule(optimizer, lr, 0.0, args.lr_warmup_iters, args.iters, "linear")
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


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def run(argv=None) -> Dict:
    import torch

    args = build_parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: --variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    sweep = args.lrs is not None
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x] if sweep else [args.lr]
    except ValueError:
        raise SystemExit(f"error: --lrs {args.lrs}: not a comma-separated list of numbers")
    if not lrs:
        raise SystemExit("error: --lrs is empty")
    torch.set_num_threads(args.threads)
    data = data_flags(args)
    vocab = vocab_size(args)
    train, valid = datasets(args, args.iters * args.micro_batch_size)
    started = time.time()
    # one run per (variant, LR); without --lrs a run is named after its variant, as before
    runs = [(f"{v}_lr{_lr_key(lr)}" if sweep else v, v, lr) for v in variants for lr in lrs]
    pending = [r for r in runs if r[1] not in PLAIN_LOOP]
    running = {}  # name -> (proc, variant, lr, start time)
    results, seconds, failed = {}, {}, {}
    from megatron_normformer.checkpoint.inference import build_inference_model

    def top_up():
        while pending and (args.jobs <= 0 or len(running) < args.jobs):
            name, v, lr = pending.pop(0)
            running[name] = (launch_framework(args, v, data, name, lr), v, lr, time.time())

    def finish(name):
        proc, v, lr, t0 = running.pop(name)
        seconds[name] = time.time() - t0
        log = os.path.join(args.output_dir, name) + ".log"
        if proc.returncode != 0:
            if not sweep:
                raise SystemExit(f"error: {v} failed (exit {proc.returncode}); see {log}")
            failed[name] = proc.returncode  # a diverged LR of a sweep is a result, not an error
            print(f"  {name}: exit {proc.returncode} (see {log})", flush=True)
            return
        model, _ = build_inference_model(os.path.join(args.output_dir, name))
        results[name] = score(model, valid, args.micro_batch_size)
        if sweep:
            print(f"  {name}: valid loss {results[name]['loss']:.4f} ({seconds[name]:.0f} s)", flush=True)

    top_up()
    for name, v, lr in runs:
        if v in PLAIN_LOOP:
            t0 = time.time()
            results[name] = score(train_plain(args, v, vocab, train, lr), valid, args.micro_batch_size)
            seconds[name] = time.time() - t0
    if not sweep:  # as before: wait for each in order
        for name in [r[0] for r in runs if r[0] in running]:
            running[name][0].wait()
            finish(name)
    while running or pending:
        top_up()
        done = [n for n, r in running.items() if r[0].poll() is not None]
        for name in done:
            finish(name)
        if not done:
            time.sleep(1)
    from bench.throughput import machine

    out = dict(command=" ".join(["bench/quality.py"] + list(argv if argv is not None else sys.argv[1:])),
               machine=machine(), elapsed_s=time.time() - started,
               recipe=dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                           num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size, iters=args.iters,
                           lr=lrs if sweep else args.lr,
                           warmup=args.lr_warmup_iters, seed=args.seed, split=args.split),
               valid_loss={v: r["loss"] for v, r in results.items()},
               valid_tokens=next(iter(results.values()))["tokens"] if results else 0)
    if sweep:
        out["llama_flags"] = " ".join(llama_flags(args))
        out["train_seconds"] = seconds
        out["failed"] = failed
        by_lr = {v: {_lr_key(lr): results[n]["loss"] if n in results else None
                     for n, vv, lr in runs if vv == v} for v in variants}
        best = {}
        for v, losses in by_lr.items():
            ok = {lr: loss for lr, loss in losses.items() if loss is not None and loss == loss}
            if ok:
                lr = min(ok, key=ok.get)
                best[v] = dict(lr=float(lr), loss=ok[lr], at_edge=lr in (_lr_key(min(lrs)), _lr_key(max(lrs))))
        out.update(valid_loss_by_lr=by_lr, best=best)
        out["normformer_minus_baseline_at_best"] = {
            v: best[v]["loss"] - best[b]["loss"] for v, b in BASELINE.items() if v in best and b in best}
    elif "reference" in results:
        out["minus_reference"] = {v: r["loss"] - results["reference"]["loss"]
                                  for v, r in results.items() if v != "reference"}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "quality.json"), "w") as f:
        json.dump(out, f, indent=1)
    if sweep:
        print("valid loss     " + "".join(f"{'lr ' + _lr_key(lr):>11s}" for lr in lrs) + "       best")
        for v in variants:
            cells = "".join(f"{'failed' if x is None else f'{x:.4f}':>11s}" for x in out["valid_loss_by_lr"][v].values())
            b = out["best"].get(v)
            print(f"{v:16s}{cells}  " + (f"{b['loss']:.4f} at {b['lr']:g}" if b else "none"))
        for v, d in out["normformer_minus_baseline_at_best"].items():
            print(f"{v} - {BASELINE[v]} at their best LRs: {d:+.4f}")
    else:
        for v in variants:
            delta = out.get("minus_reference", {}).get(v)
            extra = f"  ({delta:+.4f} vs reference)" if delta is not None else ""
            print(f"{v:10s} valid loss {results[v]['loss']:.4f}  ppl {results[v]['ppl']:.2f}{extra}")
    print(f"{out['valid_tokens']} held-out tokens; {out['elapsed_s']:.0f} s; {out['machine']}")
    return out


if __name__ == "__main__":
    run()
