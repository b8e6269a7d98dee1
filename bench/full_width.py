#!/usr/bin/env python
"""Full-width runs of the 2.7B shape: a 2-layer slice of the paper's 2.7B relu_squared model
(hidden 2,560, 32 heads, FFN 10,240, vocabulary 51,200, the recipe's NormFormer operations) trained
a few iterations by ``pretrain_gpt.py``'s own code in several layouts, whose per-iteration losses
must agree to 1e-4 (same seed, mock data and global batch; dropout 0).

    python bench/full_width.py                                  # the four layouts below
    python bench/full_width.py --layouts tp1 tp2_sp --iters 2

Layouts (processes): tp1 (1); tp2_dp2_zero3 (4: TP=2 x DP=2, ZeRO-3 partitioning every
parameter); tp2_pp2 (4: TP=2 x PP=2, ZeRO-1); tp2_sp (2: TP=2 with --sequence-parallel).
Prints a table and exits 1 when a layout's losses differ from the first one's by more than 1e-4.

To measure another version of the code, put its checkout first on PYTHONPATH: this script's own
directory is only appended to ``sys.path``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

LAYOUTS = {
    "tp1": (1, []),
    "tp2_dp2_zero3": (4, ["--tensor-model-parallel-size", "2", "--zero-stage", "3",
                          "--zero-param-persistence-threshold", "0"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--zero-stage", "1"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


def slice_flags(args) -> list:
    """pretrain_gpt.py flags of the 2.7B relu_squared recipe (examples/pretrain_gpt_2.7B_relu_squared.sh),
    cut to ``--num-layers`` layers and a short sequence."""
    return ["--model-size", "2.7B", "--num-layers", str(args.num_layers),
            "--scale-attn", "--scale-fc", "--scale-heads", "--activation-fn", "relu_squared",
            "--vocab-size", "51200", "--mock-data", "--seq-length", str(args.seq_length),
            "--max-position-embeddings", "2048", "--micro-batch-size", "1",
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
            "--lr", "6e-4", "--lr-warmup-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--seed", "1234", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0"] + \
        [flag for name in ("hidden_size", "num_attention_heads") if getattr(args, name)
         for flag in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def _train(argv: list) -> dict:
    from megatron_normformer.training.pretrain import train_from_argv

    t0 = time.time()
    summary = train_from_argv(argv)
    return {"losses": summary.losses, "seconds": time.time() - t0,
            "zero3": summary.zero3, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(argv=None) -> dict:
    from megatron_normformer.testing import spawn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, help="narrower than 2,560: a quick check of the script")
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    results = {}
    for name in args.layouts:
        world, extra = LAYOUTS[name]
        ranks = spawn(_train, world, slice_flags(args) + extra, timeout=3600)
        results[name] = {"losses": ranks[-1]["losses"], "seconds": max(r["seconds"] for r in ranks),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
                         "zero3": ranks[0]["zero3"], "ranks": world}
    ref = results[args.layouts[0]]["losses"]
    worst = 0.0
    print(f"{'layout':<15} {'ranks':>5} {'s/run':>7} {'peak RSS MiB':>12}  losses")
    for name, r in results.items():
        rel = max(abs(r["losses"][k] - ref[k]) / abs(ref[k]) for k in ref)
        worst = max(worst, rel)
        r["max_rel_diff"] = rel
        print(f"{name:<15} {r['ranks']:>5} {r['seconds']:>7.1f} {r['peak_rss_mib']:>12.0f}  "
              + " ".join(f"{r['losses'][k]:.6f}" for k in sorted(r["losses"])) + f"  (max rel diff {rel:.1e})")
        if r["zero3"]:
            print(f"{'':<15} ZeRO-3: {r['zero3']['partitioned']} parameters partitioned, "
                  f"{r['zero3']['whole']} whole")
    summary = {"args": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "results": results, "max_rel_diff": worst}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"largest relative loss difference to {args.layouts[0]}: {worst:.2e} "
          f"({'within' if worst <= 1e-4 else 'OUTSIDE'} 1e-4)")
    if worst > 1e-4:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    run()
