"""Throughput, FLOPs and MFU, the Megatron-style progress line, the metrics file and TensorBoard.

FLOPs per iteration follow Narayanan et al. (2021), generalised to an FFN of size F and counting
the NormFormer extras. Forward FLOPs of one layer on B sequences of s tokens, width h:

    QKV and output projections  8 B s h^2      attention scores and mixing  4 B s^2 h
    FFN                         4 B s h F      NormFormer (elementwise)      see below

and the logits 2 B s h V. Backward costs twice the forward; recomputing activations adds one more
forward of the layers. The masked LM runs its head (a dense h x h, then the logits) on the masked
positions only: a fraction p (0.15) of the tokens, 2 B s p (h^2 + h V). For GPT, with F = 4h and
no NormFormer, this is the paper's 72 B s l h^2 (1 + s/(6h) + V/(12 l h)). NormFormer adds per
token and layer about 5h (post-attention LN) + 5F (FFN LN) + h (HeadScale) + h (ResScale) forward
FLOPs: negligible, counted for honesty.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_normformer.config import ModelConfig

LN_FLOPS_PER_ELEMENT = 5

# Dense peak TFLOP/s per device: (bf16/fp16 tensor core, tf32/fp32 used for fp32 training).
# Matched against the upper-cased device name in this order, so variants come before their family.
PEAK_TFLOPS = {
    "H200": (989.0, 494.5),
    "H100 PCIE": (756.0, 378.0),
    "H100 NVL": (835.0, 418.0),
    "H100": (989.0, 494.5),  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": (312.0, 156.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def flops_per_iteration(cfg: ModelConfig, global_batch: int, seq: int, padded_vocab: int,
                        recompute: bool = False, head_fraction: float = 1.0,
                        head_dense: bool = False) -> float:
    """Model FLOPs of one iteration. ``head_fraction``: share of the positions that reach the output
    head (masked LM: the masked ones); ``head_dense``: the head has an h x h dense layer (RoBERTa)."""
    b, s, h, f, l = global_batch, seq, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    # QKV (K and V over G groups), W_O, scores and context, fc1 (2F rows with SwiGLU), fc2.
    qkv = (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim
    fc1 = 2 * f if cfg.swiglu else f
    layer = 2 * b * s * h * (qkv + h) + 4 * b * s * s * h + 2 * b * s * h * (fc1 + f)
    extra = 0
    if cfg.scale_attn:
        extra += LN_FLOPS_PER_ELEMENT * h
    if cfg.scale_fc:
        extra += LN_FLOPS_PER_ELEMENT * f
    if cfg.scale_heads:
        extra += h
    if cfg.scale_resids:
        extra += h
    layer += b * s * extra
    logits = 2 * b * s * head_fraction * h * (padded_vocab + (h if head_dense else 0))
    return (4 if recompute else 3) * l * layer + 3 * logits


def peak_tflops_per_device(flag: Optional[float], half_precision: bool) -> Optional[float]:
    """The flag if given, else the known peak of this GPU, else None (MFU shown as n/a)."""
    if flag:
        return flag
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, (half, full) in PEAK_TFLOPS.items():
        if key in name:
            return half if half_precision else full
    return None


def format_log_line(m: Dict) -> str:
    """Megatron's progress line."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    parts = [
        f" iteration {m['iteration']:8d}/{m['train_iters']:8d}",
        f"consumed samples: {m['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {m['ms_per_iter']:.1f}",
        f"learning rate: {m['lr']:.3E}",
        f"global batch size: {m['global_batch_size']:5d}",
        f"lm loss: {m['lm_loss']:.6E}",
        f"ppl: {num(m.get('ppl'), '.3f')}",
    ]
    if "mlm_accuracy" in m:
        parts.append(f"mlm accuracy: {num(m['mlm_accuracy'], '.4f')}")
    parts += [
        f"loss scale: {m['loss_scale']:.1f}",
        f"grad norm: {num(m.get('grad_norm'), '.3f')}",
        *([f"params norm: {m['params_norm']:.3f}"] if m.get("params_norm") is not None else []),
        *([f"num zeros: {m['num_zeros_in_grad']}"] if m.get("num_zeros_in_grad") is not None
          else []),
        f"number of skipped iterations: {m['skipped_iters']:3d}",
        f"tokens/s: {m['tokens_per_sec']:.1f}",
        f"TFLOP/s per device: {m['tflops_per_device']:.3f}",
        f"MFU: {'n/a' if m.get('mfu') is None else format(100 * m['mfu'], '.2f') + '%'}",
    ]
    return " | ".join(parts) + " |"


def safe_ppl(loss: float) -> Optional[float]:
    return math.exp(loss) if loss < 700 else None


class MetricsSink:
    """The metrics file (JSON lines) and TensorBoard; only the writing rank holds open files."""

    def __init__(self, metrics_file: Optional[str], tensorboard_dir: Optional[str], writer: bool):
        self.file = self.tb = None
        if not writer:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def record(self, record: Dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        if self.tb is not None:
            for tag, v in values.items():
                if v is not None:
                    self.tb.add_scalar(tag, v, step)

    def histograms(self, values: Dict[str, torch.Tensor], step: int) -> None:
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_histogram(tag, v.detach().float().cpu(), step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


# Megatron's timers and their --timing-log-level: 0 what happens rarely (a save), 1 what happens
# once per iteration, 2 what happens once per micro-batch. The order is the report's.
TIMER_LEVELS = {"forward-backward": 1, "forward-compute": 2, "backward-compute": 2,
                "batch-generator": 2, "optimizer": 1, "save-checkpoint": 0}


class Timers:
    """Per-phase wall-clock time of this rank, for the phases ``--timing-log-level`` selects
    (``TIMER_LEVELS``); the others cost nothing. ``with timers("optimizer"): ...`` adds the time
    of the block; on GPU the device is synchronised around it, so the time is the work's."""

    def __init__(self, level: int):
        self.names = [name for name, lvl in TIMER_LEVELS.items() if lvl <= level]
        self.elapsed = dict.fromkeys(self.names, 0.0)
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def __call__(self, name: str):
        if name not in self.elapsed:
            yield
            return
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.elapsed[name] += time.perf_counter() - start

    def timed(self, items: Iterable, name: str) -> Iterator:
        """``items``, the time spent producing each one added to ``name``."""
        items = iter(items)
        while True:
            with self(name):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item

    def per_iteration(self, names: List[str], iterations: int) -> Dict[str, tuple]:
        """{name: (min, max) over the ranks of ms per iteration} since the last ``reset``.
        Collective: every rank calls it with the same names."""
        names = [n for n in names if n in self.elapsed]
        if not names:
            return {}
        ms = torch.tensor([1000 * self.elapsed[n] / max(iterations, 1) for n in names],
                          dtype=torch.float64)
        both = torch.cat([ms, -ms])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return {n: (-both[len(names) + i].item(), both[i].item()) for i, n in enumerate(names)}

    def reset(self, names: List[str]) -> None:
        for n in names:
            if n in self.elapsed:
                self.elapsed[n] = 0.0


def format_timers(times: Dict[str, tuple]) -> str:
    """Megatron's timer report."""
    lines = ["(min, max) time across ranks (ms):"]
    for name, (low, high) in times.items():
        lines.append(f"    {name + ' ':.<48}: ({low:.2f}, {high:.2f})")
    return "\n".join(lines)
