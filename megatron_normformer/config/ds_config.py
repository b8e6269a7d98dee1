"""The DeepSpeed config of a run: generated from the flags, or a user's JSON checked against them."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Set

from megatron_normformer.config.base import ConfigError
from megatron_normformer.config.run import RunConfig


def fp32_grad_accumulation(run: RunConfig) -> bool:
    """bf16 runs accumulate and all-reduce gradients in fp32 unless told otherwise."""
    return run.train.bf16 and not run.train.no_accumulate_allreduce_grads_in_fp32


def generate(run: RunConfig, dp: int, gas: int, on_gpu: Optional[bool] = None) -> Dict:
    t = run.train
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    zero: Dict = {"stage": run.ds.zero_stage}
    if run.ds.zero_stage > 0:
        # Overlapping the gradient reduction with the backward pass needs a side stream (GPU).
        zero.update(contiguous_gradients=True, overlap_comm=bool(on_gpu))
    if run.ds.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if run.ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if run.ds.zero_stage == 3 and run.ds.zero_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = run.ds.zero_param_persistence_threshold
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * dp,
        "gradient_clipping": run.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": t.bf16},
        # DeepSpeed: loss_scale 0 = dynamic, starting at 2^initial_scale_power.
        "fp16": {"enabled": t.fp16, "loss_scale": t.loss_scale or 0,
                 "initial_scale_power": int(round(math.log2(t.initial_loss_scale))),
                 "loss_scale_window": t.loss_scale_window, "hysteresis": t.hysteresis,
                 "min_loss_scale": t.min_loss_scale},
        # We log ourselves; --cpu-torch-adam steps offloaded states with torch AdamW.
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if fp32_grad_accumulation(run):
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    if run.parallel.sequence_parallel:
        # DeepSpeed's pipeline engine sends 1/TP of a (replicated) activation from each TP rank
        # and all-gathers it on arrival; under sequence parallelism the ranks' activations are
        # different slices of the sequence, so each rank sends its own whole.
        cfg["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return _bf16_optimizer_at_zero0(cfg)


def _bf16_optimizer_at_zero0(cfg: Dict) -> Dict:
    """bf16 with fp32 gradient accumulation has no ZeRO-0 engine in DeepSpeed ("unsupported mix of
    model_dtype and grad_accum_dtype"): it runs in DeepSpeed's BF16 optimizer (fp32 master weights,
    moments and gradient accumulators), which DeepSpeed files under stage 1 because it shards the
    fp32 state over data parallelism. The training math is ZeRO-0's."""
    accum = cfg.get("data_types", {}).get("grad_accum_dtype")
    if (cfg.get("bf16", {}).get("enabled") and accum == "fp32"
            and cfg.get("zero_optimization", {}).get("stage", 0) == 0):
        cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": 1}
    return cfg


def load_user_config(path: str) -> Dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({e})") from None


def reconcile(run: RunConfig, user: Dict, explicit: Set[str], dp: int) -> RunConfig:
    """Take settings the user's DeepSpeed config gives into ``run``; an explicit flag that says
    otherwise is an error naming both. Returns ``run`` (updated in place)."""
    t, where = run.train, f"--deepspeed_config"
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"{where}: remove the {key!r} section; the optimizer (AdamW, Megatron "
                              "parameter groups) and LR schedule come from the --lr/--adam-* flags")

    def take(flag: str, dest_obj, dest: str, value, shown: Optional[str] = None):
        current = getattr(dest_obj, dest)
        if flag in explicit and current != value:
            raise ConfigError(f"{flag} {current} contradicts {shown} = {value} in {where}")
        setattr(dest_obj, dest, value)

    if "train_micro_batch_size_per_gpu" in user:
        take("--micro-batch-size", t, "micro_batch_size", int(user["train_micro_batch_size_per_gpu"]),
             "train_micro_batch_size_per_gpu")
    global_from_cfg = None
    if "train_batch_size" in user:
        global_from_cfg = int(user["train_batch_size"])
        shown = "train_batch_size"
    elif "gradient_accumulation_steps" in user:
        global_from_cfg = int(user["gradient_accumulation_steps"]) * t.micro_batch_size * dp
        shown = "gradient_accumulation_steps x micro batch x data-parallel size"
    if global_from_cfg is not None:
        take("--global-batch-size", t, "global_batch_size", global_from_cfg, shown)
        if "train_batch_size" in user and "gradient_accumulation_steps" in user:
            gas = int(user["gradient_accumulation_steps"])
            if gas * t.micro_batch_size * dp != global_from_cfg:
                raise ConfigError(f"{where}: train_batch_size {global_from_cfg} != "
                                  f"gradient_accumulation_steps {gas} x micro batch "
                                  f"{t.micro_batch_size} x data-parallel size {dp}")
    zero = user.get("zero_optimization", {})
    if "stage" in zero:
        take("--zero-stage", run.ds, "zero_stage", int(zero["stage"]), "zero_optimization.stage")
    if "offload_optimizer" in zero or "offload_param" in zero:
        devs = {zero.get(k, {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
        take("--cpu-offload", run.ds, "cpu_offload", "cpu" in devs, "zero_optimization.offload_*")
    for name in ("bf16", "fp16"):
        if name in user:
            take("--" + name, t, name, bool(user[name].get("enabled", False)), f"{name}.enabled")
    if "gradient_clipping" in user:
        take("--clip-grad", run.optim, "clip_grad", float(user["gradient_clipping"]),
             "gradient_clipping")
    return run.validate()


def build(run: RunConfig, dp: int, gas: int, user: Optional[Dict] = None) -> Dict:
    """The config passed to deepspeed.initialize: generated, with the user's file laid over it."""
    cfg = generate(run, dp, gas)
    if user:
        merged = dict(cfg)
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        cfg = merged
        cfg["train_batch_size"] = run.train.micro_batch_size * gas * dp
        cfg["gradient_accumulation_steps"] = gas
        pipeline = cfg.get("pipeline", {})
        if run.parallel.sequence_parallel and (pipeline.get("pipe_partitioned") or pipeline.get("grad_partitioned")):
            raise ConfigError("--sequence-parallel: the DeepSpeed config's pipeline.pipe_partitioned / "
                              "grad_partitioned would mix the ranks' sequence slices; set them false")
    return _bf16_optimizer_at_zero0(cfg)
