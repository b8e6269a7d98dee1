"""One training step for every caller: the trainer, the analysis tools and the benchmark.

    for each micro-batch:  loss, extra = backend.forward(batch); backend.backward(loss, last)
    on_gradients(backend, result)  -> the diagnostics to report, or False: skip the update
    backend.update()

``DeepSpeedBackend`` is the engine ``pretrain_gpt.py`` builds, at any ZeRO stage and precision;
under pipeline parallelism DeepSpeed's 1F1B schedule runs the whole step (``train_batch``).
``PlainBackend`` is a model and a torch optimizer in one process (the paper's analyses, the
benchmark's reference), optionally under autocast. ``tools/analyze_grad_norms.py``,
``tools/lr_stability_test.py`` and ``bench/throughput.py`` thus measure what the trainer runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch

from megatron_normformer.deepspeed_repairs import (
    fp16_loss_left_unscaled, fp16_scaled, reports_true_grad_norm)
from megatron_normformer.training.metrics import Timers

NO_TIMERS = Timers(level=-1)


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor):
    """The causal LM loss of a [batch, seq + 1] token tensor: the mean over its tokens."""
    return model(tokens[:, :-1], tokens[:, 1:]).float().mean(), {}


@dataclass
class StepResult:
    losses: List[torch.Tensor] = field(default_factory=list)  # per micro-batch, detached
    extras: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    diagnostics: Dict = field(default_factory=dict)
    updated: bool = True

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over the micro-batches (this rank's)."""
        return torch.stack([loss.double() for loss in self.losses]).mean()


class PlainBackend:
    """A model and a torch optimizer in one process; gradients averaged over the micro-batches."""

    pipeline = False

    def __init__(self, model: torch.nn.Module, optimizer, loss_fn: Callable, autocast=None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast = autocast or contextlib.nullcontext
        self.micro_batches = 1

    def forward(self, batch):
        with self.autocast():
            return self.loss_fn(self.model, batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.micro_batches).backward()

    def update(self, apply: bool = True) -> None:
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def zero_learning_rate(optimizer):
    """Every parameter group's learning rate at 0 inside, as it was after: a step there creates
    the optimizer state (Adam's moments) without moving the weights."""
    groups = optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def loss_scale_exhausted(error: BaseException) -> bool:
    """Whether ``error`` is DeepSpeed's fp16 loss scaler giving up: gradients that overflow again
    at the minimum scale raise a bare ``Exception`` (``deepspeed/runtime/fp16/loss_scaler.py``,
    ``DynamicLossScaler.update_scale``), on every rank together (the overflow is all-reduced)."""
    return (type(error) is Exception
            and str(error).startswith("Current loss scale already at minimum"))


def engine_grad_norm(engine) -> Optional[float]:
    """DeepSpeed's global gradient norm of the last step, or None where it has none or a wrong one:
    ``FP16_UnfusedOptimizer`` (16-bit at ZeRO-0 with a torch optimizer, pipelined here) reports the
    loss-scaled norm and counts TP-replicated and tied gradients on every rank holding them
    (``deepspeed_repairs.reports_true_grad_norm``)."""
    norm = engine.get_global_grad_norm()
    if norm is None or not reports_true_grad_norm(engine.optimizer):
        return None
    return float(norm)


class DeepSpeedBackend:
    """DeepSpeed's engine, which scales accumulated gradients itself. The accumulation boundary is
    said explicitly: a batch-size ramp changes its length during a run, which DeepSpeed's own
    count cannot follow."""

    def __init__(self, engine, loss_fn: Callable, pipeline: bool = False, pipeline_batch=None):
        self.engine, self.loss_fn, self.pipeline = engine, loss_fn, pipeline
        self.pipeline_batch, self.model = pipeline_batch, engine.module
        self.scale_loss = not pipeline and fp16_loss_left_unscaled(engine)

    def forward(self, batch):
        return self.loss_fn(self.engine, batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(fp16_scaled(loss, self.engine) if self.scale_loss else loss)
        if not last:
            self.engine.step()  # DeepSpeed's bookkeeping between micro-batches; no update

    def update(self, apply: bool = True) -> None:
        assert apply, "DeepSpeed's engine always updates at the boundary"
        self.engine.step()


def train_step(backend, batches: Iterable, num_micro_batches: int,
               on_gradients: Optional[Callable] = None, timers: Optional[Timers] = None
               ) -> StepResult:
    """One optimizer step over ``num_micro_batches`` micro-batches drawn from ``batches``.

    ``on_gradients(backend, result)`` runs between the last backward and the update (``result``
    holds the losses) and returns the diagnostics, or False to skip the update. ``timers``
    (``training/metrics.py``) times the forward-backward passes, each forward and backward, and
    the optimizer (with ``on_gradients``); under pipeline parallelism DeepSpeed's schedule runs
    all of it, timed as forward-backward."""
    result, batches = StepResult(), iter(batches)
    timers = timers or NO_TIMERS
    if backend.pipeline:  # 1F1B: the mean loss comes back averaged over data parallelism
        with timers("forward-backward"):
            data = iter([backend.pipeline_batch(next(batches)) for _ in range(num_micro_batches)])
            result.losses.append(torch.as_tensor(float(backend.engine.train_batch(data_iter=data))))
        return result
    backend.micro_batches = num_micro_batches
    with timers("forward-backward"):
        for i in range(num_micro_batches):
            batch = next(batches)
            with timers("forward-compute"):
                loss, extra = backend.forward(batch)
            with timers("backward-compute"):
                backend.backward(loss, last=i == num_micro_batches - 1)
            result.losses.append(loss.detach())
            result.extras.append(extra)
    with timers("optimizer"):
        diagnostics = on_gradients(backend, result) if on_gradients is not None else None
        result.updated = diagnostics is not False
        result.diagnostics = diagnostics or {}
        backend.update(result.updated)
    return result
