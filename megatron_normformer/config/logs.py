"""Logging: intervals, evaluation, TensorBoard and the metrics file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

@dataclass
class LoggingConfig:
    """What is reported and where."""

    log_interval: int = 100
    """Print a progress line every this many iterations (``--log-interval``)."""
    eval_interval: int = 1000
    """Validation loss and perplexity every this many iterations (``--eval-interval``)."""
    eval_iters: int = 100
    """Global batches per evaluation (``--eval-iters``); 0 disables evaluation."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard events here, NormFormer diagnostics included (``--tensorboard-dir``)."""
    metrics_file: Optional[str] = None
    """Append one JSON object per logged iteration and per evaluation (``--metrics-file``)."""
    log_params_norm: bool = False
    """Log the L2 norm of all parameters every ``--log-interval`` (``--log-params-norm``)."""
    peak_flops_per_device: Optional[float] = None
    """Peak TFLOP/s of one device, for MFU where the GPU is not known (``--peak-flops-per-device``)."""
