"""Typed configs of a training run: optimizer and schedule, batch and length, data, checkpoints,
logging, DeepSpeed. Field docstrings are the ``--help`` text of the flags (``arguments.py``).

Defaults follow the NormFormer recipe (paper Table 8, fairseq train_lm.sh): Adam (0.9, 0.98),
eps 1e-8, weight decay 0.01, linear warm-up then linear decay to 0, no gradient clipping.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Tuple

from megatron_normformer.config import ConfigError, ModelConfig, ParallelConfig

LR_DECAY_STYLES = ("linear", "cosine", "constant")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
DATA_IMPLS = ("mmap", "infer", "lazy", "cached")
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
    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay length (``--lr-warmup-fraction``), instead of
    ``--lr-warmup-iters`` / ``--lr-warmup-samples``."""
    lr_warmup_samples: int = 0
    """Sequences of linear warm-up, with ``--train-samples`` (``--lr-warmup-samples``)."""
    lr_decay_samples: Optional[int] = None
    """Sequences after which the decay reaches ``--min-lr``, with ``--train-samples``;
    ``--train-samples`` when unset (``--lr-decay-samples``)."""
    lr_warmup_tokens: Optional[int] = None
    """Tokens of linear warm-up (Megatron-DeepSpeed's ``--lr-warmup-tokens``): warm-up samples =
    tokens / ``--seq-length``."""
    lr_decay_tokens: Optional[int] = None
    """Tokens after which the decay reaches ``--min-lr`` (Megatron-DeepSpeed's
    ``--lr-decay-tokens``): decay samples = tokens / ``--seq-length``."""
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


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Dataset prefix(es), optionally weighted: ``PREFIX`` or ``0.3 A 0.7 B`` (``--data-path``)."""
    split: str = "969,30,1"
    """Train/valid/test proportions of each ``--data-path`` dataset, as Megatron-LM: of its
    sequences for GPT, of its documents for masked LM (``--split``)."""
    train_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own training data instead of ``--data-path``'s split, weighted like ``--data-path``; every
    prefix is used whole (``--train-data-path``)."""
    valid_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own validation data, as ``--train-data-path`` (``--valid-data-path``)."""
    test_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own test data, as ``--train-data-path`` (``--test-data-path``)."""
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
    data_impl: str = "mmap"
    """Format of the indexed dataset (``--data-impl``): ``mmap`` (Megatron's MMIDIDX), the only one
    read here; ``infer`` is accepted and means the same."""

    def per_split_paths(self):
        """The train, valid and test path lists, or None when ``--data-path`` is used instead."""
        paths = [self.train_data_path, self.valid_data_path, self.test_data_path]
        return paths if any(p is not None for p in paths) else None

    def describe_paths(self) -> str:
        """The data flags as given, for messages."""
        flags = (("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                 ("--valid-data-path", self.valid_data_path),
                 ("--test-data-path", self.test_data_path))
        return " ".join(f"{flag} {' '.join(value)}" for flag, value in flags if value)


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
    partition_activations: bool = False
    """Split the kept activations of recomputed layers across the TP group
    (DeepSpeed activation checkpointing, ``--partition-activations``)."""
    contigious_checkpointing: bool = False
    """Copy kept activations into one contiguous buffer (DeepSpeed's flag, its spelling); needs
    ``--partition-activations``."""
    checkpoint_in_cpu: bool = False
    """Keep the recomputed layers' inputs in CPU memory (``--checkpoint-in-cpu``); needs
    ``--partition-activations``."""
    synchronize_each_layer: bool = False
    """Synchronize the device at every recomputed layer (``--synchronize-each-layer``)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config; otherwise one is generated from the flags. A flag that contradicts
    it is an error."""


class Recompute(NamedTuple):
    """Resolved activation recomputation: ``granularity`` full or selective; with full, ``method``
    uniform (chunks of ``num_layers``) or block (the first ``num_layers`` layers)."""

    granularity: str
    method: Optional[str]
    num_layers: int


@dataclass(frozen=True)
class BatchRamp:
    """Megatron's batch-size ramp: the global batch starts at ``start`` and grows by
    ``increment`` each time another ``(ramp_samples / increments)`` sequences have been consumed,
    until it reaches ``final`` (``--global-batch-size``)."""

    start: int
    increment: int
    ramp_samples: int
    final: int

    @classmethod
    def from_run(cls, run: "RunConfig") -> "BatchRamp":
        t = run.train
        start, increment, samples = t.rampup_batch_size
        final = t.global_batch_size
        if final is None:
            raise ConfigError("--rampup-batch-size needs --global-batch-size (the batch it ramps to)")
        if t.train_iters is not None:
            raise ConfigError("--rampup-batch-size needs --train-samples (or --train-tokens): the "
                              "number of iterations follows from the ramp, as in Megatron")
        if start <= 0 or increment <= 0 or samples < 0:
            raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: start and "
                              "increment must be positive, samples >= 0")
        if start > final or (final - start) % increment:
            raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
                              f"({final}) minus the start must be a non-negative multiple of the "
                              "increment")
        return cls(start, increment, samples, final)

    def global_batch(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts after ``consumed_samples`` sequences."""
        increments = (self.final - self.start) // self.increment
        if increments == 0 or consumed_samples > self.ramp_samples:
            return self.final
        per_increment = self.ramp_samples / increments
        steps = int(consumed_samples / per_increment) if per_increment > 0 else increments
        return min(self.start + steps * self.increment, self.final)

    def sizes(self):
        """Every global batch the ramp passes through."""
        return list(range(self.start, self.final + 1, self.increment))

    def iterations(self, train_samples: int) -> int:
        """Iterations of a run over ``train_samples`` sequences, counted as Megatron counts them:
        ramp iterations while fewer than the ramp's (and the run's) samples are consumed, then
        whole final-size batches."""
        consumed = iterations = 0
        while consumed <= self.ramp_samples and consumed <= train_samples:
            consumed += self.global_batch(consumed)
            iterations += 1
        return iterations + max(0, train_samples - consumed) // self.final

    def samples(self, iterations: int) -> int:
        """Sequences consumed by the first ``iterations`` iterations."""
        consumed = 0
        for _ in range(iterations):
            consumed += self.global_batch(consumed)
        return consumed


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
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and t.seq_length % tp:
            raise ConfigError(f"--sequence-parallel splits the sequence over the {tp} tensor-parallel "
                              f"ranks: --seq-length ({t.seq_length}) must be divisible by "
                              f"--tensor-model-parallel-size ({tp})")
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
        if not d.mock_data and not d.data_path and not d.train_data_path:
            raise ConfigError("--data-path (or --train-data-path) is required unless --mock-data "
                              "is given")
        if d.data_path and d.per_split_paths():
            raise ConfigError("--data-path and --train-data-path/--valid-data-path/--test-data-path "
                              "are mutually exclusive")
        if self.ds.cpu_offload and self.ds.zero_stage == 0:
            raise ConfigError("--cpu-offload needs --zero-stage 1, 2 or 3")
        if self.ds.cpu_torch_adam and not self.ds.cpu_offload:
            raise ConfigError("--cpu-torch-adam applies to --cpu-offload only")
        if self.log.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.log.eval_iters}")
        if d.data_impl not in ("mmap", "infer"):
            raise ConfigError(f"--data-impl {d.data_impl}: only mmap datasets (Megatron's MMIDIDX "
                              "format) are read; convert the data with tools/preprocess_data.py")
        if self.ckpt.override_opt_param_scheduler and self.ckpt.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                              "are mutually exclusive")
        if self.ckpt.finetune and not self.ckpt.load:
            raise ConfigError("--finetune needs --load (the checkpoint whose weights to start from)")
        for flag, v in (("--distributed-timeout-minutes", t.distributed_timeout_minutes),
                        ("--exit-duration-in-mins", t.exit_duration_in_mins),
                        ("--checkpoint-num-layers", t.checkpoint_num_layers),
                        ("--recompute-num-layers", t.recompute_num_layers)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        self.recompute()
        self._check_schedule_flags()
        if (self.ds.contigious_checkpointing or self.ds.checkpoint_in_cpu) and not self.ds.partition_activations:
            raise ConfigError("--contigious-checkpointing and --checkpoint-in-cpu need "
                              "--partition-activations")
        if t.rampup_batch_size is not None:
            BatchRamp.from_run(self)
        return self

    def recompute(self) -> Optional["Recompute"]:
        """The activation recomputation asked for, old and new flag spellings resolved."""
        t = self.train
        granularity, method, layers = t.recompute_granularity, t.recompute_method, t.recompute_num_layers
        if t.checkpoint_activations:
            if granularity == "selective":
                raise ConfigError("--checkpoint-activations (full recomputation) contradicts "
                                  "--recompute-granularity selective")
            granularity, method = "full", method or "uniform"
            layers = layers or t.checkpoint_num_layers
        if granularity is None:
            if method is not None:
                raise ConfigError(f"--recompute-method {method} needs --recompute-granularity full")
            return None
        if granularity == "selective":
            if method is not None:
                raise ConfigError(f"--recompute-method {method} applies to --recompute-granularity "
                                  "full only (selective recomputes the core attention of every layer)")
            return Recompute("selective", None, 0)
        method, layers = method or "uniform", layers or 1
        if self.parallel.pipeline_model_parallel_size > 1 and method == "block":
            raise ConfigError("--recompute-method block is not available with "
                              "--pipeline-model-parallel-size > 1 (DeepSpeed's pipeline recomputes "
                              "uniform chunks); use --recompute-method uniform")
        return Recompute("full", method, layers)

    def _check_schedule_flags(self) -> None:
        o, t = self.optim, self.train
        warmups = [flag for flag, v in (("--lr-warmup-fraction", o.lr_warmup_fraction),
                                        ("--lr-warmup-iters", o.lr_warmup_iters),
                                        ("--lr-warmup-samples", o.lr_warmup_samples),
                                        ("--lr-warmup-tokens", o.lr_warmup_tokens)) if v]
        if len(warmups) > 1:
            raise ConfigError(f"give one warm-up length, not {' and '.join(warmups)}")
        decays = [flag for flag, v in (("--lr-decay-iters", o.lr_decay_iters),
                                       ("--lr-decay-samples", o.lr_decay_samples),
                                       ("--lr-decay-tokens", o.lr_decay_tokens)) if v is not None]
        if len(decays) > 1:
            raise ConfigError(f"give one decay length, not {' and '.join(decays)}")
        if o.lr_warmup_fraction is not None and not 0 <= o.lr_warmup_fraction <= 1:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {o.lr_warmup_fraction}")
        for flag, v in (("--lr-warmup-samples", o.lr_warmup_samples),
                        ("--lr-warmup-tokens", o.lr_warmup_tokens)):
            if v is not None and v < 0:
                raise ConfigError(f"{flag} must be >= 0, got {v}")
        for flag, v in (("--lr-decay-iters", o.lr_decay_iters), ("--lr-decay-samples", o.lr_decay_samples),
                        ("--lr-decay-tokens", o.lr_decay_tokens)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if t.train_iters is not None:
            for flag, v in (("--lr-warmup-samples", o.lr_warmup_samples),
                            ("--lr-decay-samples", o.lr_decay_samples)):
                if v:
                    raise ConfigError(f"{flag} goes with --train-samples; with --train-iters use "
                                      f"{flag.replace('samples', 'iters')}")

    def lr_schedule_samples(self, global_batch: int) -> Tuple[int, int]:
        """(warm-up, decay) lengths of the learning-rate schedule in sequences, as Megatron counts
        them: iteration lengths times the (final) global batch, token lengths over the sequence
        length; the decay defaults to the whole run, a warm-up fraction is of the decay."""
        o, t = self.optim, self.train
        if o.lr_decay_samples is not None:
            decay = o.lr_decay_samples
        elif o.lr_decay_tokens is not None:
            decay = o.lr_decay_tokens // t.seq_length
        elif o.lr_decay_iters is not None:
            decay = o.lr_decay_iters * global_batch
        else:
            decay = self.train_samples(global_batch)
        if o.lr_warmup_fraction is not None:
            warmup = int(o.lr_warmup_fraction * decay)
        elif o.lr_warmup_samples:
            warmup = o.lr_warmup_samples
        elif o.lr_warmup_tokens:
            warmup = o.lr_warmup_tokens // t.seq_length
        else:
            warmup = o.lr_warmup_iters * global_batch
        return warmup, decay

    def batch_layout(self, world_size: int):
        """(data-parallel size, gradient-accumulation steps, global batch) for ``world_size`` ranks."""
        dp = self.parallel.data_parallel_size(world_size)
        micro = self.train.micro_batch_size
        global_batch = self.train.global_batch_size or micro * dp
        if global_batch % (micro * dp):
            raise ConfigError(
                f"--global-batch-size ({global_batch}) must be a multiple of --micro-batch-size "
                f"({micro}) x data-parallel size ({dp})")
        ramp = self.batch_ramp()
        for size in ramp.sizes() if ramp else ():
            if size % (micro * dp):
                raise ConfigError(
                    f"--rampup-batch-size passes through a global batch of {size}, not a multiple "
                    f"of --micro-batch-size ({micro}) x data-parallel size ({dp})")
        return dp, global_batch // (micro * dp), global_batch

    def batch_ramp(self) -> Optional["BatchRamp"]:
        return None if self.train.rampup_batch_size is None else BatchRamp.from_run(self)

    def train_samples(self, global_batch: int) -> int:
        """Sequences the run trains on: ``--train-samples``, or what its iterations consume."""
        t = self.train
        if t.train_iters is not None:
            return t.train_iters * global_batch
        if t.train_samples is not None:
            return t.train_samples
        return -(-t.train_tokens // t.seq_length)

    def train_iters(self, global_batch: int) -> int:
        t = self.train
        if t.train_iters is not None:
            return t.train_iters
        ramp = self.batch_ramp()
        if ramp is not None:
            return ramp.iterations(self.train_samples(global_batch))
        return -(-self.train_samples(global_batch) // global_batch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
