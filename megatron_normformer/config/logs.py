"""Logging: intervals, evaluation, TensorBoard and the metrics file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TIMING_LOG_LEVELS = (0, 1, 2)

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
    tensorboard_log_interval: Optional[int] = None
    """Write the training scalars to TensorBoard every this many iterations; ``--log-interval``
    when unset (Megatron's default is 1) (``--tensorboard-log-interval``)."""
    log_loss_scale_to_tensorboard: bool = True
    """Write the loss scale to TensorBoard (``train/loss_scale``; 1 without fp16), Megatron's
    default; ``--no-log-loss-scale-to-tensorboard`` leaves it out."""
    log_num_zeros_in_grad: bool = False
    """Count the zero entries of the gradient (before the optimizer step; each TP-replicated
    parameter and the tied embedding once): ``num zeros`` in the log line, ``num_zeros_in_grad`` in
    the metrics file and TensorBoard (``--log-num-zeros-in-grad``). Not available with pipeline
    parallelism, whose engine steps inside its schedule."""
    log_optimizer_states_to_tensorboard: bool = False
    """Write the L2 and L1 norms and the largest magnitude of the optimizer's states and fp32
    master weights to TensorBoard (``optimizer/momentum_l2`` ...), each over the whole model in any
    layout (``--log-optimizer-states-to-tensorboard``)."""
    timing_log_level: int = field(default=0, metadata={"choices": TIMING_LOG_LEVELS})
    """Which phases are timed and reported with (min, max) over the ranks: 0 the iteration and
    the checkpoint saves; 1 also forward-backward and the optimizer step (once per iteration); 2
    also the data, and the forward and backward passes of every micro-batch
    (``--timing-log-level``, Megatron's levels)."""
    log_timers_to_tensorboard: bool = False
    """Write the timers of ``--timing-log-level`` to TensorBoard (``timers/<name>``, ms per
    iteration, the slowest rank's) (``--log-timers-to-tensorboard``)."""
