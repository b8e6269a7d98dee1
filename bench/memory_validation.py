#!/usr/bin/env python
"""The memory planner (megatron_normformer/memory.py) against real training runs: each
configuration is trained by pretrain_gpt.py's own code (``train_from_argv``) on spawned gloo
processes, the way the tests launch multi-rank runs, and each rank's peak memory is compared with
the planner's estimate for the same flags (``--device cpu``: what a CPU run touches).

    python bench/memory_validation.py                     # every configuration, hidden 512
    python bench/memory_validation.py --configs dp1_fp32 tp2_sp --hidden-size 768

What is measured, per rank: the kernel's high-water mark of the resident set (VmHWM, reset
through /proc/self/clear_refs, bench/checkpoint_save.py's PeakRSS) over the whole training run,
minus the resident set just before it, after a warm-up run of the same layout at width 32 in the
same process. The warm-up leaves behind what is not the run's: torch, DeepSpeed and every module
imported lazily, the process groups and gloo's buffers, the thread pools, DeepSpeed's one-off
allocations; what it allocated for its own tiny model is freed before the baseline is read
(``malloc_trim``), and a fixed mmap threshold makes every tensor's memory go back to the system
when it is freed. What remains in the difference is the model being built, its gradients,
optimizer state, activations, logits and communication buffers: what the planner estimates.
Exits 1 when an estimate is off by more than ``--tolerance``.

To measure another version of the code, put its checkout first on PYTHONPATH: this script's own
directory is only appended to ``sys.path``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from bench.checkpoint_save import PeakRSS  # noqa: E402

# name: (ranks, layout flags)
CONFIGS = {
    "dp1_fp32": (1, []),
    "dp1_bf16": (1, ["--bf16"]),
    "dp1_full_recompute": (1, ["--recompute-granularity", "full"]),
    "dp1_selective": (1, ["--recompute-granularity", "selective"]),
    "dp2_zero1": (2, ["--zero-stage", "1"]),
    "dp2_zero3": (2, ["--zero-stage", "3"]),
    "dp2_zero2_offload": (2, ["--zero-stage", "2", "--cpu-offload", "--cpu-torch-adam"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}
# The minimum a mmap'd allocation has: above it every tensor's memory is returned when freed.
MMAP_THRESHOLD = str(128 * 1024)


def model_flags(args) -> list:
    """The measured model and run: NormFormer (all four operations), dropout on, 2 iterations
    (the second has the optimizer state), 2 micro-batches per iteration (1F1B keeps both)."""
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads),
            "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
            "--vocab-size", str(args.vocab_size), "--micro-batch-size", str(args.micro_batch_size),
            "--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--mock-data", "--train-iters", "2", "--lr", "1e-4", "--seed", "1",
            "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0"]


def batch_flags(world: int, layout: list, micro_batch: int) -> list:
    tp = pp = 1
    if "--tensor-model-parallel-size" in layout:
        tp = int(layout[layout.index("--tensor-model-parallel-size") + 1])
    if "--pipeline-model-parallel-size" in layout:
        pp = int(layout[layout.index("--pipeline-model-parallel-size") + 1])
    dp = world // (tp * pp)
    return ["--global-batch-size", str(2 * micro_batch * dp)]


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure(runs: list) -> list:
    """spawn() target: each (warm-up argv, measured argv) in turn; this rank's peak over its
    baseline for each."""
    from megatron_normformer.training.pretrain import train_from_argv

    out = []
    for warmup, argv in runs:
        train_from_argv(warmup)
        _release_freed_memory()
        t0 = time.time()
        with PeakRSS() as peak:
            train_from_argv(argv)
        out.append({"extra": peak.extra, "baseline": peak.start, "seconds": time.time() - t0})
        _release_freed_memory()
    return out


def estimate_for(argv: list, world: int) -> list:
    """The planner's per-stage totals (``--device cpu``) for pretrain flags ``argv``."""
    from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
    from megatron_normformer.memory import estimate

    run = run_config_from_args(build_pretrain_parser().parse_args(argv))
    return estimate(run, world, device="cpu")


def stage_of_rank(rank: int, est) -> int:
    """Ranks are ordered TP fastest, then DP, then PP (parallel/state.py)."""
    return rank // (est.layout.tp * est.layout.dp)


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)

    from megatron_normformer.testing import spawn

    warm = argparse.Namespace(**{**vars(args), "hidden_size": 32, "num_attention_heads": 4,
                                 "num_layers": 2, "seq_length": 16, "micro_batch_size": 1})
    by_world = {}
    for name in args.configs:
        world, layout = CONFIGS[name]
        measured = model_flags(args) + batch_flags(world, layout, args.micro_batch_size) + layout
        warmup = model_flags(warm) + batch_flags(world, layout, 1) + layout
        by_world.setdefault(world, []).append((name, warmup, measured))
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by each child's malloc at start
    results = {}
    try:
        for world, entries in by_world.items():
            ranks = spawn(_measure, world, [(w, m) for _, w, m in entries], timeout=3600)
            for i, (name, _, measured) in enumerate(entries):
                est = estimate_for(measured, world)
                rows = []
                for rank in range(world):
                    got = ranks[rank][i]["extra"]
                    want = est.stages[stage_of_rank(rank, est)].total
                    rows.append(dict(rank=rank, measured=got, estimated=want,
                                     error=(want - got) / got, seconds=ranks[rank][i]["seconds"]))
                results[name] = {"ranks": world, "flags": CONFIGS[name][1], "per_rank": rows}
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    worst = max(abs(r["error"]) for v in results.values() for r in v["per_rank"])
    summary = {"args": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "results": results, "max_abs_error": worst}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        mb = 2 ** 20
        print(f"{'config':<20} {'rank':>4} {'measured MiB':>12} {'estimated MiB':>13} {'error':>7} {'s':>6}")
        for name, v in results.items():
            for r in v["per_rank"]:
                print(f"{name:<20} {r['rank']:>4} {r['measured'] / mb:>12.1f} {r['estimated'] / mb:>13.1f} "
                      f"{100 * r['error']:>+6.1f}% {r['seconds']:>6.1f}")
        print(f"largest error: {100 * worst:.1f} % ({'within' if worst <= args.tolerance else 'OUTSIDE'} "
              f"{100 * args.tolerance:.0f} %)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)
    if worst > args.tolerance and __name__ == "__main__":
        sys.exit(1)
    return summary


if __name__ == "__main__":
    run()
