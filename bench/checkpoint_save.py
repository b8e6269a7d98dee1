#!/usr/bin/env python
"""Checkpoint save cost per rank: wall time and peak extra host memory (RSS) of DeepSpeed's own
save and of the layout-independent state (``megatron_normformer/checkpoint/universal.py``).

Builds the engine ``pretrain_gpt.py`` builds (mock data, ZeRO stage and precision from the flags),
runs one training step so the optimizer state exists, then saves twice and reports, per rank, the
seconds and the largest RSS rise above the pre-save level (the kernel's peak-RSS mark).

    python bench/checkpoint_save.py --num-layers 20 --hidden-size 1024 --num-attention-heads 16 \\
        --vocab-size 32000 --world-size 2 --zero-stage 3 --bf16

To measure another version of the code, put its checkout first on PYTHONPATH: this script's own
directory is only appended to ``sys.path``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Largest RSS while the block runs: the kernel's high-water mark (VmHWM), reset on entry
    through /proc/self/clear_refs, so native code holding the GIL is measured too."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        self.start = _rss_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = max(_hwm_bytes(), _rss_bytes())
        self.extra = self.peak - self.start


def _measure(argv, out_dir):
    import torch.distributed as dist

    from megatron_normformer.arguments import build_pretrain_parser
    from megatron_normformer.parallel.state import ParallelState
    from megatron_normformer.training.engine import build_engine
    from megatron_normformer.training.tasks import get_task
    from megatron_normformer.training.loop import warmup_step
    from megatron_normformer.training.pretrain import layout, resolve
    from megatron_normformer.checkpoint.universal import save_universal

    _, run, user, explicit = resolve(build_pretrain_parser(), argv)
    ds, _, gas = layout(run, user, explicit, dist.get_world_size())
    pstate = ParallelState(run.parallel.tensor_model_parallel_size,
                           run.parallel.pipeline_model_parallel_size)
    gpt = get_task("gpt")
    e = build_engine(run, pstate, ds, gpt)
    warmup_step(e, run, gas, pstate, gpt)  # creates the optimizer state
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())
    largest = max(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())
    tag_dir = os.path.join(out_dir, "tag")
    dist.barrier()
    with PeakRSS() as ds_save:
        e.deepspeed.save_checkpoint(out_dir, tag="tag", save_latest=False)
        dist.barrier()
    with PeakRSS() as universal:
        save_universal(e.deepspeed, e.module, pstate, run.model, tag_dir)
        dist.barrier()  # every rank's file written before rank 0 sums their sizes
    files = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                os.walk(os.path.join(tag_dir, "universal")) for f in fs)
    return dict(rank=dist.get_rank(), params=n_params, largest_tensor=largest,
                ds_seconds=ds_save.seconds, ds_extra_rss=ds_save.extra, rss_before=universal.start,
                universal_seconds=universal.seconds, universal_extra_rss=universal.extra,
                universal_bytes=files)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_normformer.testing import spawn

    train = ["--mock-data", "--train-iters", "1", "--seq-length", "16",
             "--max-position-embeddings", "16", "--micro-batch-size", "1", "--num-workers", "0",
             "--eval-iters", "0", "--lr", "1e-4"]
    with tempfile.TemporaryDirectory() as out:
        results = spawn(_measure, args.world_size, train + rest, out, timeout=3600)
    if args.json:
        print(json.dumps(results, indent=1))
        return results
    mb = 2 ** 20
    r0 = results[0]
    print(f"{r0['params'] / 1e6:.0f}M parameters (largest tensor {r0['largest_tensor'] / 1e6:.1f}M), "
          f"{args.world_size} ranks, {platform.processor() or platform.machine()}, flags: {' '.join(rest)}")
    print("rank  DeepSpeed save s  extra RSS MiB | universal save s  extra RSS MiB  RSS before MiB  universal/ MiB")
    for r in results:
        print(f"{r['rank']:4d}  {r['ds_seconds']:16.1f}  {r['ds_extra_rss'] / mb:13.0f} | "
              f"{r['universal_seconds']:16.1f}  {r['universal_extra_rss'] / mb:13.0f}  "
              f"{r['rss_before'] / mb:14.0f}  {r['universal_bytes'] / mb:9.0f}")
    return results


if __name__ == "__main__":
    main()
