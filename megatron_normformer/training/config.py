"""Typed configs of a training run: optimizer and schedule, batch and length, data, checkpoints,
logging, DeepSpeed. Field docstrings are the ``--help`` text of the flags (``arguments.py``).

Defaults follow the NormFormer recipe (paper Table 8, fairseq train_lm.sh): Adam (0.9, 0.98),
eps 1e-8, weight decay 0.01, linear warm-up then linear decay to 0, no gradient clipping.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_normformer.config import ConfigError, ModelConfig, ParallelConfig

LR_DECAY_STYLES = ("linear", "cosine", "constant")
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HFTokenizer", "NullTokenizer")


@dataclass
class OptimizerConfig:
    """AdamW with Megatron parameter groups and the learning-rate schedule."""

    lr: float = 3e-3
    """Peak learning rate (``--lr``); the paper's NormFormer 125M value is the default."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (``--min-lr``)."""
    lr_decay_style: str = field(default="linear", metadata={"choices": LR_DECAY_STYLES})
    """Shape of the decay after warm-up: linear, cosine or constant (``--lr-decay-style``)."""
    lr_warmup_iters: int = 0
    """Iterations of linear warm-up from 0 to ``--lr`` (``--lr-warmup-iters``)."""
    lr_decay_iters: Optional[int] = None
    """Iteration at which the decay reaches ``--min-lr``; ``--train-iters`` when unset."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay (``--weight-decay``). By default, as in Megatron, biases and
    every 1-D parameter (LayerNorm weights, HeadScale gamma, ResScale lambda) are exempt."""
    weight_decay_all: bool = False
    """Decay every parameter, norms, biases and NormFormer scales included, as fairseq does."""
    clip_grad: float = 0.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping (the paper's runs)."""
    adam_beta1: float = 0.9
    """Adam beta1 (``--adam-beta1``)."""
    adam_beta2: float = 0.98
    """Adam beta2 (``--adam-beta2``)."""
    adam_eps: float = 1e-8
    """Adam epsilon (``--adam-eps``)."""


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
    no_accumulate_allreduce_grads_in_fp32: bool = False
    """With --bf16: accumulate and all-reduce gradients in bf16 instead of fp32 (the default, as
    Megatron's --accumulate-allreduce-grads-in-fp32; DeepSpeed's data_types.grad_accum_dtype).
    Saves memory; loses precision over many accumulation steps."""
    checkpoint_activations: bool = False
    """Recompute each layer's activations in the backward pass (DeepSpeed activation checkpointing)."""
    exit_interval: Optional[int] = None
    """Save and exit when the iteration is a multiple of this (``--exit-interval``)."""


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Dataset prefix(es), optionally weighted: ``PREFIX`` or ``0.3 A 0.7 B`` (``--data-path``)."""
    split: str = "969,30,1"
    """Train/valid/test proportions of the documents (``--split``)."""
    mock_data: bool = False
    """Random tokens instead of a dataset, for tests and benchmarks (``--mock-data``)."""
    data_cache_path: Optional[str] = None
    """Directory of the cached sample-index arrays; next to the data by default."""
    tokenizer_type: Optional[str] = field(default=None, metadata={"choices": TOKENIZER_TYPES})
    """Tokenizer that produced the data; its vocabulary size sizes the model."""
    tokenizer_model: Optional[str] = None
    """SentencePiece model or HF tokenizer.json file (``--tokenizer-model``)."""
    vocab_file: Optional[str] = None
    """GPT-2 BPE vocabulary (``--vocab-file``)."""
    merge_file: Optional[str] = None
    """GPT-2 BPE merges (``--merge-file``)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (``--num-workers``)."""


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
    no_save_universal: bool = False
    """Skip the layout-independent copy of weights and Adam moments saved next to DeepSpeed's
    files (``--no-save-universal``): saves are faster and smaller, but the checkpoint can then only
    resume in the layout that wrote it and ``tools/convert_checkpoint.py`` cannot read it."""


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
    peak_flops_per_device: Optional[float] = None
    """Peak TFLOP/s of one device, for MFU where the GPU is not known (``--peak-flops-per-device``)."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    zero_stage: int = field(default=0, metadata={"choices": (0, 1, 2, 3)})
    """ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also parameters."""
    cpu_offload: bool = False
    """Offload optimizer states (ZeRO 1-3) and parameters (ZeRO-3) to CPU memory; the optimizer
    step then runs in DeepSpeed's vectorised DeepSpeedCPUAdam."""
    cpu_torch_adam: bool = False
    """With --cpu-offload: step with torch's AdamW instead of DeepSpeedCPUAdam (which DeepSpeed
    compiles on first use)."""
    zero_param_persistence_threshold: Optional[int] = None
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank instead of being
    partitioned (DeepSpeed's stage3_param_persistence_threshold; its default, 100000, when unset).
    0 partitions every parameter."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config; otherwise one is generated from the flags. A flag that contradicts
    it is an error."""


CONFIG_CLASSES = (OptimizerConfig, TrainingConfig, DataConfig, CheckpointConfig, LoggingConfig,
                  DeepSpeedConfig)


@dataclass
class RunConfig:
    """Everything a training run is built from; saved in every checkpoint."""

    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimizerConfig
    train: TrainingConfig
    data: DataConfig
    ckpt: CheckpointConfig
    log: LoggingConfig
    ds: DeepSpeedConfig

    def validate(self) -> "RunConfig":
        """Checks that need no process group; raise ConfigError naming the flag(s)."""
        t, o, d = self.train, self.optim, self.data
        pp = self.parallel.pipeline_model_parallel_size
        if pp < 1:
            raise ConfigError(f"--pipeline-model-parallel-size must be positive, got {pp}")
        if pp > 1 and self.ds.zero_stage >= 2:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} with --zero-stage {self.ds.zero_stage}: "
                "DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only. Use --zero-stage 1 "
                "with pipeline parallelism, or --pipeline-model-parallel-size 1 with ZeRO-2/3 "
                "(tensor parallelism can take the memory pressure instead)")
        if pp > 1 and self.model.num_layers < pp:
            raise ConfigError(f"--num-layers ({self.model.num_layers}) must be at least "
                              f"--pipeline-model-parallel-size ({pp})")
        lengths = [name for name, v in (("--train-iters", t.train_iters),
                                        ("--train-samples", t.train_samples),
                                        ("--train-tokens", t.train_tokens)) if v is not None]
        if len(lengths) != 1:
            raise ConfigError("give exactly one of --train-iters, --train-samples, --train-tokens"
                              + (f" (got {', '.join(lengths)})" if lengths else ""))
        for flag, v in (("--micro-batch-size", t.micro_batch_size), ("--seq-length", t.seq_length),
                        ("--global-batch-size", t.global_batch_size),
                        ("--train-iters", t.train_iters), ("--train-samples", t.train_samples),
                        ("--train-tokens", t.train_tokens), ("--log-interval", self.log.log_interval),
                        ("--eval-interval", self.log.eval_interval),
                        ("--save-interval", self.ckpt.save_interval),
                        ("--exit-interval", t.exit_interval)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if t.seq_length > self.model.max_position_embeddings:
            raise ConfigError(f"--seq-length ({t.seq_length}) exceeds --max-position-embeddings "
                              f"({self.model.max_position_embeddings})")
        if t.bf16 and t.fp16:
            raise ConfigError("--bf16 and --fp16 are mutually exclusive")
        if t.no_accumulate_allreduce_grads_in_fp32 and not t.bf16:
            raise ConfigError("--no-accumulate-allreduce-grads-in-fp32 applies to --bf16 only")
        scale = t.initial_loss_scale
        if scale < 1 or 2 ** round(math.log2(scale)) != scale:
            raise ConfigError(f"--initial-loss-scale must be a power of 2 (>= 1), got {scale}")
        if t.min_loss_scale <= 0 or t.min_loss_scale > scale:
            raise ConfigError(f"need 0 < --min-loss-scale ({t.min_loss_scale}) <= "
                              f"--initial-loss-scale ({scale})")
        if t.loss_scale is not None and t.loss_scale <= 0:
            raise ConfigError(f"--loss-scale must be positive, got {t.loss_scale}")
        for flag, v in (("--loss-scale-window", t.loss_scale_window), ("--hysteresis", t.hysteresis)):
            if v < 1:
                raise ConfigError(f"{flag} must be at least 1, got {v}")
        threshold = self.ds.zero_param_persistence_threshold
        if threshold is not None and threshold < 0:
            raise ConfigError(f"--zero-param-persistence-threshold must be >= 0, got {threshold}")
        if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr})")
        if o.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {o.lr_warmup_iters}")
        if o.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 disables clipping), got {o.clip_grad}")
        if not d.mock_data and not d.data_path:
            raise ConfigError("--data-path is required unless --mock-data is given")
        if self.ds.cpu_offload and self.ds.zero_stage == 0:
            raise ConfigError("--cpu-offload needs --zero-stage 1, 2 or 3")
        if self.ds.cpu_torch_adam and not self.ds.cpu_offload:
            raise ConfigError("--cpu-torch-adam applies to --cpu-offload only")
        if self.log.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.log.eval_iters}")
        return self

    def batch_layout(self, world_size: int):
        """(data-parallel size, gradient-accumulation steps, global batch) for ``world_size`` ranks."""
        dp = self.parallel.data_parallel_size(world_size)
        micro = self.train.micro_batch_size
        global_batch = self.train.global_batch_size or micro * dp
        if global_batch % (micro * dp):
            raise ConfigError(
                f"--global-batch-size ({global_batch}) must be a multiple of --micro-batch-size "
                f"({micro}) x data-parallel size ({dp})")
        return dp, global_batch // (micro * dp), global_batch

    def train_iters(self, global_batch: int) -> int:
        t = self.train
        if t.train_iters is not None:
            return t.train_iters
        samples = t.train_samples
        if samples is None:
            samples = -(-t.train_tokens // t.seq_length)
        return -(-samples // global_batch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
