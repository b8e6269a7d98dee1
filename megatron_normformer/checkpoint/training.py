"""Training checkpoints: DeepSpeed's model/optimizer/schedule files plus what exact resume needs.

Layout of ``--save DIR``::

    DIR/latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
    DIR/iter_0000010/               DeepSpeed's files (model, optimizer, ZeRO partitions, schedule)
    DIR/iter_0000010/run.json       run config, iteration, consumed samples/tokens (rank 0)
    DIR/iter_0000010/rng_rank00003.pt   every RNG state of global rank 3 (one file per rank)

DeepSpeed keeps ``client_state`` from rank 0 only, but every rank has its own RNG streams (the TP
dropout stream differs per TP rank), hence one file per rank. A save that dies half-way leaves
``latest`` on the previous tag.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_normformer.checkpoint.universal import load_universal, save_universal
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.parallel.random import get_all_rng_states, set_all_rng_states

LATEST = "latest"
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic_write(path, write)


def save_checkpoint(engine, run_dict: Dict, state: Dict, save_dir: str, universal=None) -> str:
    """Save on every rank; ``state`` holds iteration / consumed_samples / consumed_tokens.

    ``universal`` = (module, pstate, model config) also writes the layout-independent state that
    lets the checkpoint resume into another (TP, PP, ZeRO) layout.
    """
    tag = tag_for(state["iteration"])
    rank = dist.get_rank()
    os.makedirs(save_dir, exist_ok=True)
    engine.save_checkpoint(save_dir, tag=tag, client_state=dict(state), save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    _atomic_write(os.path.join(tag_dir, f"rng_rank{rank:05d}.pt"),
                  lambda tmp: torch.save(get_all_rng_states(), tmp))
    if universal is not None:
        save_universal(engine, *universal, tag_dir)
    if rank == 0:
        meta = dict(state, run=run_dict, world_size=dist.get_world_size())
        _atomic_text(os.path.join(tag_dir, "run.json"), json.dumps(meta, indent=1))
    dist.barrier()  # every rank's files are on disk before the pointer moves
    if rank == 0:
        _atomic_text(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return tag


def has_checkpoint(load_dir: str) -> bool:
    return os.path.isfile(os.path.join(load_dir, LATEST))


def resolve_tag(load_dir: str, tag: Optional[str] = None) -> str:
    """``tag``, or the newest complete checkpoint's (``latest``), checked to exist in ``load_dir``."""
    if not os.path.isdir(load_dir):
        if os.path.isfile(load_dir):  # a fairseq checkpoint.pt, a consolidated .safetensors file
            raise ConfigError(f"--load {load_dir}: a file, not a training checkpoint directory; make "
                              f"one with tools/convert_checkpoint.py --load {load_dir} --save DIR")
        raise ConfigError(f"--load {load_dir}: no such directory")
    if tag is None:
        path = os.path.join(load_dir, LATEST)
        if not os.path.isfile(path):
            raise ConfigError(f"--load {load_dir}: no complete checkpoint (no '{LATEST}' file)")
        with open(path) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise ConfigError(f"--load {load_dir}: no checkpoint {tag!r}")
    return tag


def read_latest(load_dir: str) -> str:
    """The tag a training run resumes from: the newest complete one, with its run.json."""
    tag = resolve_tag(load_dir)
    if not os.path.isfile(os.path.join(load_dir, tag, "run.json")):
        raise ConfigError(f"--load {load_dir}: '{LATEST}' names {tag!r}, which has no run.json")
    return tag


def layout_differences(meta: Dict, run_dict: Dict, world_size: int, load_dir: str) -> list:
    """Why DeepSpeed's own files cannot be loaded here (empty: they can). A different model is an
    error naming the first differences; a different layout only reroutes the load."""
    saved, now = meta["run"], run_dict
    # Dropout may change between runs; the init scheme only decided the weights the checkpoint
    # replaces (checkpoints from before --init-scheme existed do not record it).
    free = ("hidden_dropout", "attention_dropout", "init_scheme", "init_method_std")
    # A field the checkpoint does not record was added later: the checkpoint has its default.
    saved_model = {**_FIELD_DEFAULTS, **saved["model"]}
    model_diffs = [f"{k}: checkpoint {saved_model.get(k)!r} vs this run {v!r}"
                   for k, v in now["model"].items() if k not in free and saved_model.get(k) != v]
    if model_diffs:
        hint = ""
        if saved["model"].get("scale_embedding") is False and now["model"].get("scale_embedding"):
            hint = " (add --no-scale-embedding to continue a model trained without the sqrt(d) scale)"
        raise ConfigError(f"--load {load_dir}: checkpoint does not match this run: "
                          + "; ".join(model_diffs) + hint)
    if meta.get("universal_only"):
        return ["converted checkpoint (no DeepSpeed files)"]
    diffs = []
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        a, b = saved["parallel"].get(key, 1), now["parallel"].get(key, 1)
        if a != b:
            diffs.append(f"{key}: checkpoint {a} vs this run {b}")

    def fp32_accumulation(run_dict):  # checkpoints from before the flag accumulated bf16 in bf16
        t = run_dict["train"]
        return bool(t.get("bf16")) and not t.get("no_accumulate_allreduce_grads_in_fp32", True)

    if fp32_accumulation(saved) != fp32_accumulation(now):
        # A different DeepSpeed optimizer wrapper (BF16 optimizer vs the unfused bf16 one).
        diffs.append(f"bf16 gradient accumulation in fp32: checkpoint {fp32_accumulation(saved)} "
                     f"vs this run {fp32_accumulation(now)}")
    stage_saved, stage_now = saved["ds"]["zero_stage"], now["ds"]["zero_stage"]
    if stage_saved != stage_now:
        diffs.append(f"zero_stage: checkpoint {stage_saved} vs this run {stage_now}")
    elif meta["world_size"] != world_size:
        diffs.append(f"world size: checkpoint {meta['world_size']} vs this run {world_size}")
    return diffs


def load_checkpoint(e, run, pstate, load_dir: str, load_optim: bool = True, load_rng: bool = True,
                    materialize_optimizer_state=None) -> Optional[Dict]:
    """Restore everything; return the saved iteration / consumed_samples / consumed_tokens.

    In the layout that wrote it, DeepSpeed's files are loaded and the resume is bit-exact. In any
    other layout the layout-independent state is loaded instead (weights, Adam moments and step,
    LR schedule position, data position); RNG streams restart from the seed, since dropout
    streams are per-rank.
    """
    tag = read_latest(load_dir)
    tag_dir = os.path.join(load_dir, tag)
    with open(os.path.join(tag_dir, "run.json")) as f:
        meta = json.load(f)
    engine = e.engine
    diffs = layout_differences(meta, run.to_dict(), dist.get_world_size(), load_dir)
    state = {k: meta[k] for k in ("iteration", "consumed_samples", "consumed_tokens")}
    if diffs:
        if dist.get_rank() == 0:
            print(f"> --load {load_dir}: layout changed ({'; '.join(diffs)}); loading the "
                  "layout-independent state", flush=True)
        load_universal(engine, e.model, pstate, run.model, tag_dir,
                       materialize_optimizer_state if load_optim else None)
        if load_optim:
            e.schedule.load_state_dict({"num_steps": state["iteration"],
                                        "num_samples": state["consumed_samples"]})
        engine.global_steps = state["iteration"]
        engine.global_samples = state["consumed_samples"]
        return state
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optim,
                                     load_lr_scheduler_states=load_optim,
                                     load_module_only=not load_optim)
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed found no checkpoint files under {tag}")
    if load_rng:
        rng_file = os.path.join(tag_dir, f"rng_rank{dist.get_rank():05d}.pt")
        if not os.path.isfile(rng_file):
            raise ConfigError(f"--load {load_dir}: {rng_file} missing (saved with another world "
                              "size?); pass --no-load-rng to start fresh RNG streams")
        set_all_rng_states(torch.load(rng_file, weights_only=False))
    return state
