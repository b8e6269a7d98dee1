"""Where checkpoints are saved, loaded, and what a load restores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory to save checkpoints in (``--save``)."""
    load: Optional[str] = None
    """Directory to resume from: its ``latest`` tag (``--load``)."""
    save_interval: Optional[int] = None
    """Save every this many iterations, and at the end (``--save-interval``)."""
    no_load_optim: bool = False
    """Load weights only: fresh optimizer and LR schedule (``--no-load-optim``)."""
    no_load_rng: bool = False
    """Do not restore the RNG states (``--no-load-rng``)."""
    no_save_optim: bool = False
    """Save the weights without the optimizer state (``--no-save-optim``): a fraction of the size.
    A resume from such a checkpoint starts a fresh optimizer (Adam's moments and step at zero), the
    learning rate going on from the saved iteration, and says so."""
    no_save_rng: bool = False
    """Save no RNG states (``--no-save-rng``); a resume from such a checkpoint starts the RNG
    streams from ``--seed`` and says so."""
    use_checkpoint_args: bool = False
    """Take the model's configuration from the ``--load`` checkpoint's ``run.json`` instead of the
    model flags (``--use-checkpoint-args``); where there is no checkpoint yet, the flags."""
    finetune: bool = False
    """Start a new run from the ``--load`` checkpoint's weights only: iteration, consumed samples,
    optimizer, learning-rate schedule and RNG start fresh (``--finetune``)."""
    override_opt_param_scheduler: bool = False
    """On resume, take the learning-rate schedule's settings (``--lr``, ``--min-lr``, warm-up,
    decay, style) from the flags even where the checkpoint's differ."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, take the learning-rate schedule's settings from the checkpoint, whatever the
    flags say. Without either flag a difference is an error."""
    no_save_universal: bool = False
    """Skip the layout-independent copy of weights and Adam moments saved next to DeepSpeed's
    files (``--no-save-universal``): saves are faster and smaller, but the checkpoint can then only
    resume in the layout that wrote it and ``tools/convert_checkpoint.py`` cannot read it."""
