"""Model, optimizer, LR schedule and the DeepSpeed engine of a run, built in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megatron_normformer.config import ConfigError, RunConfig
from megatron_normformer.model.attention import ParallelAttention
from megatron_normformer.model.layer import LayerRecompute
from megatron_normformer.parallel import random as tp_random
from megatron_normformer.parallel.state import init_deepspeed_comm
from megatron_normformer.training import diagnostics
from megatron_normformer.training.schedule import LRSchedule
from megatron_normformer.training.step import Fp16ScaledLoss, engine_skips_fp16_loss_scaling
from megatron_normformer.training.tasks import get_task


@dataclass
class Engine:
    engine: object  # deepspeed.DeepSpeedEngine
    model: torch.nn.Module  # the task's model, or the stage's PipelineModule when pipelined
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
    apex's), torch's ``torch`` AdamW otherwise. All three are the same decoupled-weight-decay Adam."""
    if run.ds.cpu_offload:
        return "torch" if run.ds.cpu_torch_adam else "cpu_adam"
    return "fused" if on_gpu else "torch"


def build_optimizer(run: RunConfig, groups: List[Dict], impl: str):
    o = run.optim
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


def undo_initial_zero_step(optimizer) -> None:
    """DeepSpeed's ZeRO-0 fp16/bf16 wrappers (``FP16_Optimizer``, ``FP16_UnfusedOptimizer``) create
    the inner optimizer's state by stepping it once on zero gradients: Adam's step count starts at
    1, so the first real update is about 0.74 x Adam's first, and the fp32 masters are weight-decayed
    once. Undo that step: the masters copied back from the 16-bit weights they were cloned from,
    the state emptied (AdamW builds it again at the first real step). ZeRO 1-3 do not step."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for master, weight in zip(masters, weights):
                master.data.copy_(weight.data)
    elif isinstance(optimizer, FP16_Optimizer):
        for master, weights in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat):
            master.data.copy_(weights)
    else:
        return
    optimizer.optimizer.state.clear()


def clip_by_the_true_norm(optimizer, model, pstate, pipeline: bool) -> None:
    """``FP16_UnfusedOptimizer`` (16-bit at ZeRO-0 with a torch optimizer) clips by a norm that
    leaves out every gradient of the TP ranks > 0 (DeepSpeed's ``get_weight_norm`` tells
    TP-replicated tensors by an attribute that gradients lack) and counts a pipeline's tied
    embedding on both stages: it clips by the true norm instead, loss-scaled as it expects."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer) or optimizer.clip_grad <= 0:
        return
    unscale_and_clip = optimizer.unscale_and_clip_grads

    def unscale_and_clip_grads(total_norm, apply_scale=True):
        return unscale_and_clip(diagnostics.grad_norm(model, pstate, 0, pipeline), apply_scale)

    optimizer.unscale_and_clip_grads = unscale_and_clip_grads


def release_last_stage_buffers(engine) -> None:
    """Free what DeepSpeed's PipelineEngine keeps alive on the last stage after it is last needed.

    The engine keeps each micro-batch's forward output in a pipe buffer (``pipe_buffers
    ["outputs"]``) for its backward pass and frees it at the end of that backward, except on the
    last stage, whose backward pass returns before it gets there (``deepspeed/runtime/pipe/
    engine.py``, ``_exec_backward_pass``). There the output is the logits [micro batch, seq, padded
    vocab / TP], which nothing reads once the loss has been computed from them (the cross entropy
    keeps its own softmax, the output projection its inputs, the last stage sends nothing on): each
    pipe buffer (two at least) kept one micro-batch's logits through the rest of the iteration and
    into the next, up to two logits tensors above the cross entropy's own (0.8 GiB each at micro
    batch 4, seq 2048, GPT-2's vocabulary, bf16). The reference is dropped right after each forward
    pass; ``eval_batch(return_logits=True)`` keeps its own (``engine.outputs``).

    The engine's ``loss`` also keeps its micro-batch's autograd graph after the backward pass,
    until the next forward replaces it (through the optimizer step, into the next iteration): its
    nodes hold no saved tensors any more, but the one accumulating into the received activations
    (a leaf) holds that tensor, and with it its gradient, after both have been sent. The loss is
    detached once its backward pass has run."""
    from deepspeed.runtime.pipe import schedule

    if not engine.is_last_stage():
        return
    instructions = type(engine)._INSTRUCTION_MAP
    forward, backward = instructions[schedule.ForwardPass], instructions[schedule.BackwardPass]

    def forward_then_release(self, buffer_id):
        forward(self, buffer_id)
        self.pipe_buffers["outputs"][buffer_id] = None

    def backward_then_release(self, buffer_id):
        backward(self, buffer_id)
        self.loss = self.loss.detach() if torch.is_tensor(self.loss) else [l.detach() for l in self.loss]

    # _exec_schedule looks each instruction up in this map: the instance's copy shadows the class's.
    engine._INSTRUCTION_MAP = {**instructions, schedule.ForwardPass: forward_then_release,
                               schedule.BackwardPass: backward_then_release}


def build_engine(run: RunConfig, pstate, ds_config: Dict, task=None) -> Engine:
    """``task`` (``training/tasks.py``, GPT when None) says which model to build."""
    import deepspeed

    task = get_task(task)
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
    # DeepSpeed 0.19's ZeRO-0 16-bit wrappers and pipeline engine, mended (each function says how).
    undo_initial_zero_step(ds_optimizer)
    clip_by_the_true_norm(ds_optimizer, model, pstate, pipeline)
    if pipeline:
        release_last_stage_buffers(engine)
    if pipeline and engine_skips_fp16_loss_scaling(engine):
        model.loss_fn = Fp16ScaledLoss(model.loss_fn, engine.optimizer)
    # ZeRO rebuilds the parameter groups inside its own optimizer wrapper: drive those.
    schedule.optimizer = ds_optimizer
    schedule.apply()
    return Engine(engine, model, schedule, ds_config, stage, pipeline)
