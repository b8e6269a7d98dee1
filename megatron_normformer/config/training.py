"""Batch, length, precision, recomputation and the other knobs of the training loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class TrainingConfig:
    """Batch sizes, run length, precision, memory savers."""

    micro_batch_size: int = 1
    """Sequences per rank per forward/backward (``--micro-batch-size``)."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all data-parallel ranks; micro x DP when unset. The
    difference is made up by gradient accumulation (``--global-batch-size``)."""
    seq_length: int = 1024
    """Tokens per training sequence (``--seq-length``)."""
    train_iters: Optional[int] = None
    """Optimizer steps to train for (``--train-iters``)."""
    train_samples: Optional[int] = None
    """Sequences to train on instead of ``--train-iters`` (``--train-samples``)."""
    train_tokens: Optional[int] = None
    """Tokens to train on instead of ``--train-iters`` (``--train-tokens``)."""
    seed: int = 1234
    """Seed of the initialisation, dropout and data order (``--seed``)."""
    bf16: bool = False
    """bfloat16 mixed precision (``--bf16``)."""
    fp16: bool = False
    """float16 mixed precision with dynamic loss scaling (``--fp16``)."""
    loss_scale: Optional[float] = None
    """Static fp16 loss scale; dynamic scaling when unset (``--loss-scale``)."""
    initial_loss_scale: float = 2.0 ** 32
    """Dynamic fp16 loss scaling starts here; a power of 2 (``--initial-loss-scale``)."""
    min_loss_scale: float = 1.0
    """Dynamic fp16 loss scaling never goes below this (``--min-loss-scale``)."""
    loss_scale_window: int = 1000
    """Overflow-free iterations after which the dynamic fp16 loss scale doubles
    (``--loss-scale-window``)."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic fp16 loss scale halves (``--hysteresis``)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop at the first iteration whose loss or gradient norm is not finite, on every rank before
    anything is saved, at every ZeRO stage and precision (Megatron's check, on by default;
    ``--no-check-for-nan-in-loss-and-grad`` trains on). The overflowing steps of fp16's dynamic
    loss scaling are exempt: they are skipped, counted and bounded by
    ``--max-consecutive-skipped-iterations``."""
    max_consecutive_skipped_iterations: int = 32
    """fp16 with dynamic loss scaling: stop after this many consecutive iterations skipped for
    overflowing gradients. Each overflow halves the scale (at ZeRO 1-3 after ``--hysteresis``), so
    32 in a row take Megatron's initial 2^32 down to 1: a run that still overflows has diverged.
    At ZeRO 1-3 an overflow at ``--min-loss-scale`` stops the run too (DeepSpeed's scaler gives
    up there; its ZeRO-0 wrapper would skip on)."""
    no_accumulate_allreduce_grads_in_fp32: bool = False
    """With --bf16: accumulate and all-reduce gradients in bf16 instead of fp32 (the default, as
    Megatron's --accumulate-allreduce-grads-in-fp32; DeepSpeed's data_types.grad_accum_dtype).
    Saves memory; loses precision over many accumulation steps."""
    rampup_batch_size: Optional[List[int]] = field(default=None, metadata={"nargs": 3})
    """``START INCREMENT SAMPLES``: the global batch grows from START by INCREMENT in equal steps
    over the first SAMPLES sequences, up to ``--global-batch-size`` (``--rampup-batch-size``)."""
    checkpoint_activations: bool = False
    """Recompute activations in the backward pass: the older spelling of
    ``--recompute-granularity full --recompute-method uniform`` (``--checkpoint-activations``)."""
    checkpoint_num_layers: int = 1
    """Layers per recomputed chunk with ``--checkpoint-activations`` (``--checkpoint-num-layers``)."""
    recompute_granularity: Optional[str] = field(default=None,
                                                 metadata={"choices": RECOMPUTE_GRANULARITIES})
    """``full``: recompute whole layers (see ``--recompute-method``); ``selective``: recompute only
    the core attention (scores, softmax, dropout, context) of every layer."""
    recompute_method: Optional[str] = field(default=None, metadata={"choices": RECOMPUTE_METHODS})
    """With ``full``: ``uniform`` recomputes chunks of ``--recompute-num-layers`` layers (only each
    chunk's input is kept); ``block`` recomputes the first ``--recompute-num-layers`` layers (of each
    pipeline stage) one by one and keeps the others' activations."""
    recompute_num_layers: Optional[int] = None
    """Chunk size (uniform) or number of recomputed layers (block); 1 when unset."""
    exit_interval: Optional[int] = None
    """Save and exit when the iteration is a multiple of this (``--exit-interval``)."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit once training has run this many minutes (``--exit-duration-in-mins``)."""
    distributed_timeout_minutes: int = 30
    """Timeout of the collectives (``--distributed-timeout-minutes``); a rank that waits longer for
    the others fails instead of hanging."""
    eod_mask_loss: bool = False
    """Leave out of the loss the targets that follow an end-of-document token (``--eod-mask-loss``)."""
    reset_position_ids: bool = False
    """Restart the position ids at 0 after every end-of-document token (``--reset-position-ids``)."""
    reset_attention_mask: bool = False
    """Tokens after an end-of-document token attend only to their own document
    (``--reset-attention-mask``): a block-diagonal causal mask instead of the plain causal one."""


class Recompute(NamedTuple):
    """Resolved activation recomputation: ``granularity`` full or selective; with full, ``method``
    uniform (chunks of ``num_layers``) or block (the first ``num_layers`` layers)."""

    granularity: str
    method: Optional[str]
    num_layers: int
