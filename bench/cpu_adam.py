#!/usr/bin/env python
"""AdamW step time on the CPU, where --cpu-offload runs the optimizer: DeepSpeed's DeepSpeedCPUAdam
(what --cpu-offload uses) against torch's AdamW (--cpu-torch-adam; its default foreach kernel and its
fused one), on fp32 parameters with fresh random gradients, after warm-up steps.

    python bench/cpu_adam.py --params 20e6 --tensors 4 --steps 3 --threads 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def _time_steps(make, params, steps: int):
    opt = make(params)
    times = []
    for i in range(steps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        t0 = time.perf_counter()
        opt.step()
        if i:  # the first step allocates the moments
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    n = int(args.params) // args.tensors
    kw = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    impls = {
        "DeepSpeedCPUAdam": lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **kw),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
    }
    print(f"{args.tensors} x {n / 1e6:.1f}M fp32 parameters, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for name, make in impls.items():
        params = [torch.nn.Parameter(torch.randn(n)) for _ in range(args.tensors)]
        seconds = _time_steps(make, params, args.steps)
        print(f"{name:24s} {seconds * 1000:9.1f} ms/step  {args.params / seconds / 1e9:6.2f} G params/s")


if __name__ == "__main__":
    main()
