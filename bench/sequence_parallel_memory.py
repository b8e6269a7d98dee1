#!/usr/bin/env python
"""Activation memory saved by sequence parallelism: one training step at TP=2 with and without
``--sequence-parallel``, each in fresh processes.

Per rank it reports two measures of the step's activation memory:

- ``saved``: the bytes autograd keeps for the backward pass (every tensor saved by a forward op,
  parameters excluded, each storage counted once), the quantity sequence parallelism divides;
- ``peak``: the rise of the process's resident memory (the kernel's high-water mark) over the
  forward and backward pass above its level before the step, which adds the allocator's
  temporaries and the gradients.

    python bench/sequence_parallel_memory.py                       # NormFormer, 4 x 1024, seq 2048
    python bench/sequence_parallel_memory.py --hidden-size 2560 --num-attention-heads 32 \\
        --ffn-hidden-size 10240 --num-layers 2 --seq-length 1024

To measure another version of the code, put its checkout first on PYTHONPATH: this script's own
directory is only appended to ``sys.path``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from bench.checkpoint_save import PeakRSS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--ffn-hidden-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hidden-dropout", type=float, default=0.1)
    p.add_argument("--attention-dropout", type=float, default=0.1)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    p.add_argument("--baseline", action="store_true", help="plain Pre-LN instead of NormFormer")
    p.add_argument("--output", help="write the results as JSON here")
    return p


def _step(args_dict: dict, sequence_parallel: bool) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_normformer.config import ModelConfig
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.random import seed_everything
    from megatron_normformer.parallel.state import ParallelState

    a = argparse.Namespace(**args_dict)
    normformer = not a.baseline
    cfg = ModelConfig(num_layers=a.num_layers, hidden_size=a.hidden_size,
                      num_attention_heads=a.num_attention_heads, ffn_hidden_size=a.ffn_hidden_size,
                      vocab_size=a.vocab_size, max_position_embeddings=a.seq_length,
                      hidden_dropout=a.hidden_dropout, attention_dropout=a.attention_dropout,
                      scale_attn=normformer, scale_fc=normformer, scale_heads=normformer,
                      scale_resids=normformer)
    pstate = ParallelState(a.tensor_model_parallel_size, 1, sequence_parallel=sequence_parallel)
    seed_everything(1, pstate.tp_rank)
    model = GPTModel(cfg, pstate, seed=1)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (a.micro_batch_size, a.seq_length + 1),
                           generator=torch.Generator().manual_seed(2))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    dist.barrier()
    with PeakRSS() as peak:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
    dist.barrier()
    return {"saved": sum(saved.values()), "peak": peak.extra, "loss": loss.item()}


def run(argv=None) -> dict:
    from megatron_normformer.testing import spawn

    args = build_parser().parse_args(argv)
    tp = args.tensor_model_parallel_size
    results = {}
    for name, sp in (("tp", False), ("tp_sp", True)):
        results[name] = spawn(_step, tp, vars(args), sp, timeout=3600)
    mb = 2 ** 20
    print(f"{'layout':<10} {'rank':>4} {'saved MiB':>10} {'peak MiB':>9} {'loss':>10}")
    for name, ranks in results.items():
        for rank, r in enumerate(ranks):
            print(f"{name:<10} {rank:>4} {r['saved'] / mb:>10.1f} {r['peak'] / mb:>9.1f} {r['loss']:>10.6f}")
    saved = [results["tp_sp"][r]["saved"] / results["tp"][r]["saved"] for r in range(tp)]
    peak = [results["tp_sp"][r]["peak"] / results["tp"][r]["peak"] for r in range(tp)]
    summary = {"args": vars(args), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "results": results,
               "saved_ratio": max(saved), "peak_ratio": max(peak)}
    print(f"with --sequence-parallel at TP={tp}: saved activations x{max(saved):.3f}, "
          f"peak step memory x{max(peak):.3f} (largest over ranks)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    run()
