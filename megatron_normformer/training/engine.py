"""Model, optimizer, LR schedule and the DeepSpeed engine of a run, built in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megatron_normformer.config import ConfigError, RunConfig
from megatron_normformer.deepspeed_repairs import (
    Fp16ScaledLoss, check_deepspeed_version, clip_by_the_true_norm, fp16_loss_left_unscaled,
    release_last_stage_buffers, undo_initial_zero_step)
from megatron_normformer.model.attention import ParallelAttention
from megatron_normformer.model.layer import LayerRecompute
from megatron_normformer.parallel import random as tp_random
from megatron_normformer.parallel.state import init_deepspeed_comm
from megatron_normformer.training import diagnostics
from megatron_normformer.training.schedule import LRSchedule
from megatron_normformer.training.tasks import Task


@dataclass
class Engine:
    """What ``build_engine`` made for a run."""

    deepspeed: object
    """DeepSpeed's engine (``DeepSpeedEngine``, or ``PipelineEngine`` when pipelined): forward,
    backward, step, checkpoints."""
    module: torch.nn.Module
    """The task's model, or this stage's PipelineModule when pipelined (the engine wraps it)."""
    schedule: LRSchedule
    ds_config: Dict
    zero_stage: int
    pipeline: bool = False


def _shape(p: torch.Tensor):
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions leave p.shape empty


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool) -> List[Dict]:
    """Megatron grouping: biases and 1-D parameters (norm weights, HeadScale, ResScale) get no
    weight decay. ``decay_all`` (fairseq) decays everything."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_all or not (name.endswith(".bias") or len(_shape(p)) == 1):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_impl(run: RunConfig, on_gpu: bool) -> str:
    """Which AdamW steps the optimizer states: DeepSpeed's vectorised ``cpu_adam`` where they are
    offloaded to host memory, DeepSpeed's ``fused`` multi-tensor kernel on GPU (as Megatron uses
    apex's), torch's ``torch`` AdamW otherwise. All three are the same decoupled-weight-decay Adam.
    ``--optimizer sgd``: torch's ``sgd`` everywhere."""
    if run.optim.optimizer == "sgd":
        return "sgd"
    if run.ds.cpu_offload:
        return "torch" if run.ds.cpu_torch_adam else "cpu_adam"
    return "fused" if on_gpu else "torch"


def build_optimizer(run: RunConfig, groups: List[Dict], impl: str):
    o = run.optim
    if impl == "sgd":  # weight decay per parameter group, added to the gradient (Megatron's SGD)
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.sgd_momentum)
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    if impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if impl == "fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def check_precision(run: RunConfig) -> None:
    """bf16 / fp16 only where DeepSpeed's accelerator supports them (its CPU accelerator: bf16)."""
    if not (run.train.bf16 or run.train.fp16):
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    flag, supported = (("--bf16", accelerator.is_bf16_supported()) if run.train.bf16
                       else ("--fp16", accelerator.is_fp16_supported()))
    if not supported:
        alternative = "--bf16 or fp32" if run.train.fp16 else "fp32"
        raise ConfigError(f"{flag} is not supported by DeepSpeed's {accelerator.device_name()} "
                          f"accelerator here; use {alternative} (no precision flag = fp32)")


def apply_recompute(model: torch.nn.Module, recompute, checkpoint, pipeline: bool) -> None:
    """Full recomputation: the model's layer stack (``model/layer.py``; the pipeline does its own);
    selective: the core attention of every layer."""
    if recompute is None:
        return
    if recompute.granularity == "selective":
        for module in model.modules():
            if isinstance(module, ParallelAttention):
                module.recompute_core = checkpoint
    elif not pipeline:
        model.recompute = LayerRecompute(checkpoint, recompute.method, recompute.num_layers)


def build_engine(run: RunConfig, pstate, ds_config: Dict, task: Task) -> Engine:
    """``task`` (``training/tasks.py``) says which model to build."""
    import deepspeed

    check_deepspeed_version()
    task.validate(run)
    check_precision(run)
    # Adopt the process group we already created (zero.Init and friends read deepspeed.comm).
    init_deepspeed_comm()
    stage = ds_config["zero_optimization"]["stage"]
    recompute = run.recompute()
    if recompute is not None:
        # DeepSpeed's checkpoint replays the TP dropout stream: make its tracker ours.
        d = run.ds
        deepspeed.checkpointing.configure(pstate, partition_activations=d.partition_activations,
                                          contiguous_checkpointing=d.contigious_checkpointing,
                                          checkpoint_in_cpu=d.checkpoint_in_cpu,
                                          synchronize=d.synchronize_each_layer, profile=False)
        tp_random.set_rng_tracker(deepspeed.checkpointing.get_cuda_rng_tracker())
    tp_random.seed_everything(run.train.seed, pstate.tp_rank, pstate.pp_rank)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    pipeline = pstate.pp_size > 1
    if pipeline:
        # DeepSpeed's pipeline recomputes uniform chunks of this many layers of each stage.
        full = recompute is not None and recompute.granularity == "full"
        model = task.build_pipeline(run.model, pstate, run.train.seed,
                                    activation_checkpoint_interval=recompute.num_layers if full else 0,
                                    run=run)
        if device is not None:
            model = model.to(device)
    elif stage == 3:
        # Every module partitions its parameters over DP right after its own __init__ has filled
        # them, so no rank ever holds the full model.
        remote = "cpu" if run.ds.cpu_offload else None
        # zero.Init partitions over data_parallel_group only; mpu alone would mean the whole world.
        with deepspeed.zero.Init(data_parallel_group=pstate.dp_group, mpu=pstate,
                                 config_dict_or_path=ds_config, remote_device=remote):
            model = task.build_model(run.model, pstate, run.train.seed, device)
        # Weights read outside their own module's forward must be gathered for the whole forward.
        for param in task.external_parameters(model):
            deepspeed.zero.register_external_parameter(model, param)
    else:
        model = task.build_model(run.model, pstate, run.train.seed, device)
    apply_recompute(model, recompute, deepspeed.checkpointing.checkpoint, pipeline)

    o = run.optim
    optimizer = build_optimizer(run, param_groups(model, o.weight_decay, o.weight_decay_all),
                                optimizer_impl(run, device is not None))
    global_batch = ds_config["train_batch_size"]
    warmup, decay = run.lr_schedule_samples(global_batch)
    ramp = run.batch_ramp()
    schedule = LRSchedule(optimizer, o.lr, o.min_lr, warmup, decay, o.lr_decay_style,
                          batch_size=ramp.global_batch(0) if ramp else global_batch)
    schedule.resume_settings = ("flags" if run.ckpt.override_opt_param_scheduler else
                                "checkpoint" if run.ckpt.use_checkpoint_opt_param_scheduler else "check")
    # The pipeline engine builds its own groups from the module's topology (same rank order).
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                      lr_scheduler=schedule,
                                                      mpu=None if pipeline else pstate,
                                                      config=ds_config)
    # DeepSpeed 0.19's ZeRO-0 16-bit wrappers and pipeline engine, mended (deepspeed_repairs.py).
    undo_initial_zero_step(ds_optimizer)
    clip_by_the_true_norm(ds_optimizer, lambda: diagnostics.grad_norm(model, pstate, 0, pipeline))
    if pipeline:
        release_last_stage_buffers(engine)
    if pipeline and fp16_loss_left_unscaled(engine):
        model.loss_fn = Fp16ScaledLoss(model.loss_fn, engine)
    # ZeRO rebuilds the parameter groups inside its own optimizer wrapper: drive those.
    schedule.optimizer = ds_optimizer
    schedule.apply()
    return Engine(engine, model, schedule, ds_config, stage, pipeline)
