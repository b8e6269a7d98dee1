"""A whole training run (``RunConfig``): every section, and the checks that span them."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_normformer.config.base import ConfigError
from megatron_normformer.config.checkpoint import CheckpointConfig
from megatron_normformer.config.data import DataConfig
from megatron_normformer.config.deepspeed import DeepSpeedConfig
from megatron_normformer.config.logs import LoggingConfig
from megatron_normformer.config.model import ModelConfig
from megatron_normformer.config.optim import OptimizerConfig
from megatron_normformer.config.parallel import ParallelConfig
from megatron_normformer.config.training import Recompute, TrainingConfig

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


FLOAT32_MAX = 3.4028234663852886e38

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
                        ("--exit-interval", t.exit_interval),
                        ("--distributed-timeout-minutes", t.distributed_timeout_minutes),
                        ("--exit-duration-in-mins", t.exit_duration_in_mins),
                        ("--checkpoint-num-layers", t.checkpoint_num_layers),
                        ("--recompute-num-layers", t.recompute_num_layers),
                        ("--max-consecutive-skipped-iterations",
                         t.max_consecutive_skipped_iterations),
                        ("--tensorboard-log-interval", self.log.tensorboard_log_interval)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and t.seq_length % tp:
            raise ConfigError(f"--sequence-parallel splits the sequence over the {tp} tensor-parallel "
                              f"ranks: --seq-length ({t.seq_length}) must be divisible by "
                              f"--tensor-model-parallel-size ({tp})")
        longest = self.model.max_sequence_length  # None: rotary positions, no table to run off
        if longest is not None and t.seq_length > longest:
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
        self._check_optimizer_numbers()
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
        if self.ckpt.no_save_optim and self.ckpt.no_save_universal:
            raise ConfigError("--no-save-optim saves the weights in the layout-independent form: "
                              "it cannot go with --no-save-universal")
        if self.ckpt.finetune and not self.ckpt.load:
            raise ConfigError("--finetune needs --load (the checkpoint whose weights to start from)")
        self.recompute()
        self._check_schedule_flags()
        if (self.ds.contigious_checkpointing or self.ds.checkpoint_in_cpu) and not self.ds.partition_activations:
            raise ConfigError("--contigious-checkpointing and --checkpoint-in-cpu need "
                              "--partition-activations")
        if t.rampup_batch_size is not None:
            BatchRamp.from_run(self)
        return self

    def _check_optimizer_numbers(self) -> None:
        o = self.optim
        for flag, v in (("--lr", o.lr), ("--min-lr", o.min_lr)):
            if not math.isfinite(v):
                raise ConfigError(f"{flag} must be a finite number, got {v}")
        if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr})")
        for flag, v in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
            if not 0 <= v < 1:
                raise ConfigError(f"{flag} must be in [0, 1), got {v}")
        if o.sgd_momentum < 0:
            raise ConfigError(f"--sgd-momentum must be >= 0, got {o.sgd_momentum}")
        # The optimizer applies the rate in float32: torch refuses a step it cannot represent.
        if o.optimizer == "adam" and o.lr / (1 - o.adam_beta1) > FLOAT32_MAX:
            raise ConfigError(f"--lr {o.lr:g} is too large for float32: Adam's first update is "
                              f"--lr / (1 - --adam-beta1) = {o.lr / (1 - o.adam_beta1):.3g}, beyond "
                              f"float32's largest value {FLOAT32_MAX:.3g}")
        if o.lr > FLOAT32_MAX:
            raise ConfigError(f"--lr {o.lr:g} is beyond float32's largest value {FLOAT32_MAX:.3g}")

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
