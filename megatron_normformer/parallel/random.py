"""Random-number streams that respect tensor parallelism.

Two streams are needed, as in Megatron:
- the default generator, seeded identically on the ranks of a TP group, for dropout on replicated
  activations (residual branches, embeddings), so every TP rank drops the same elements;
- the "model-parallel" stream, seeded differently per TP rank, for dropout on sharded activations
  (attention probabilities of the rank's own heads).

The tracker follows DeepSpeed's ``CudaRNGStatesTracker`` interface (``add``, ``fork``,
``get_states``, ``set_states``), so DeepSpeed's activation checkpointing can save and replay it.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's offset; keeps the TP stream apart from the default one


def _device_rng_get():
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _device_rng_set(state):
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states swapped in and out of the device generator."""

    def __init__(self):
        self.states = {}

    def reset(self):
        self.states = {}

    def get_states(self):
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states):
        self.states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int):
        if name in self.states:
            raise RuntimeError(f"RNG state {name} already exists")
        saved = _device_rng_get()
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _device_rng_get()
        _device_rng_set(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise RuntimeError(f"RNG state {name} was never added; call seed_everything() first")
        saved = _device_rng_get()
        _device_rng_set(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _device_rng_get()
            _device_rng_set(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker():
    return _TRACKER


def set_rng_tracker(tracker) -> None:
    """Use another tracker with the same interface (e.g. DeepSpeed's, for activation checkpointing)."""
    global _TRACKER
    _TRACKER = tracker


def seed_everything(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed python, numpy, torch (same across TP and DP, offset per pipeline stage) and the TP stream."""
    default_seed = seed + 100 * pp_rank
    random.seed(default_seed)
    np.random.seed(default_seed % (2 ** 32))
    torch.manual_seed(default_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(default_seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, default_seed + _TP_SEED_OFFSET + tp_rank)


def get_all_rng_states() -> dict:
    """Every RNG state a bit-exact resume needs."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_all_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_rng_tracker().set_states(states["tracker"])
