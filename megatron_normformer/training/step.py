"""One training step for every caller: the trainer, the analysis tools and the benchmark.

A step runs the micro-batches of one global batch forward and backward, lets the caller look at
the finished gradients (the diagnostics, a finiteness check), and updates the weights:

    for each micro-batch:  loss, extra = backend.forward(batch)
                           backend.backward(loss, last)      gradients averaged over micro-batches
    on_gradients(backend, result) -> diagnostics, or False: skip the update
    backend.update()

Two backends run it. ``DeepSpeedBackend`` is the engine ``pretrain_gpt.py`` builds, at any ZeRO
stage and precision; under pipeline parallelism DeepSpeed's 1F1B schedule runs the whole step
(``train_batch``) and ``on_gradients`` is not called. ``PlainBackend`` is a model and a torch
optimizer in one process (the paper's analyses, the benchmark's reference), optionally under
autocast. Both report the same fields, so the trainer, ``tools/analyze_grad_norms.py``,
``tools/lr_stability_test.py`` and ``bench/throughput.py`` measure one thing the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

Batch = object
LossFn = Callable[[torch.nn.Module, Batch], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor):
    """The causal LM loss of a [batch, seq + 1] token tensor: the mean over its tokens."""
    return model(tokens[:, :-1], tokens[:, 1:]).float().mean(), {}


@dataclass
class StepResult:
    losses: list = field(default_factory=list)  # per micro-batch, detached
    extras: list = field(default_factory=list)  # per micro-batch: {name: scalar tensor}
    diagnostics: Dict = field(default_factory=dict)
    updated: bool = True

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss over the micro-batches (this rank's)."""
        return torch.stack([loss.double() for loss in self.losses]).mean()


class PlainBackend:
    """A model and a torch optimizer in one process."""

    pipeline = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast = autocast or contextlib.nullcontext
        self.micro_batches = 1

    def forward(self, batch):
        with self.autocast():
            return self.loss_fn(self.model, batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.micro_batches).backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedBackend:
    """DeepSpeed's engine (``training/engine.py``): it scales the accumulated gradients itself and
    updates at the accumulation boundary, which we state explicitly (a batch-size ramp changes the
    accumulation length during a run, which DeepSpeed's own count cannot follow)."""

    def __init__(self, engine, loss_fn: LossFn, pipeline: bool = False, pipeline_batch=None):
        self.engine, self.loss_fn, self.pipeline = engine, loss_fn, pipeline
        self.pipeline_batch = pipeline_batch
        self.model = engine.module

    def forward(self, batch):
        return self.loss_fn(self.engine, batch)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # DeepSpeed's bookkeeping between micro-batches; no update

    def update(self) -> None:
        self.engine.step()

    def skip_update(self) -> None:  # never asked for by the trainer
        raise NotImplementedError("DeepSpeed's engine always steps at the boundary")

    def train_batch(self, batches: Iterable, num_micro_batches: int) -> torch.Tensor:
        """The pipeline's 1F1B step over ``num_micro_batches``; the mean loss, averaged over DP."""
        data = iter([self.pipeline_batch(next(batches)) for _ in range(num_micro_batches)])
        return self.engine.train_batch(data_iter=data)


def train_step(backend, batches: Iterable, num_micro_batches: int,
               on_gradients: Optional[Callable[[object, StepResult], Optional[Dict]]] = None
               ) -> StepResult:
    """One optimizer step over ``num_micro_batches`` micro-batches drawn from ``batches``.

    ``on_gradients(backend, result)`` runs between the last backward and the update (``result``
    holds the micro-batches' losses so far) and returns the diagnostics to report, or False to
    skip the update (e.g. non-finite gradients)."""
    result = StepResult()
    batches = iter(batches)
    if backend.pipeline:
        result.losses.append(torch.as_tensor(float(backend.train_batch(batches, num_micro_batches))))
        return result
    backend.micro_batches = num_micro_batches
    for i in range(num_micro_batches):
        loss, extra = backend.forward(next(batches))
        backend.backward(loss, last=i == num_micro_batches - 1)
        result.losses.append(loss.detach())
        result.extras.append(extra)
    diagnostics = on_gradients(backend, result) if on_gradients is not None else {}
    if diagnostics is False:
        result.updated = False
        backend.skip_update()
    else:
        result.diagnostics = diagnostics or {}
        backend.update()
    return result
