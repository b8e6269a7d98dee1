"""Checkpoints: DeepSpeed's model/optimizer/schedule files plus what exact resume needs.

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

import json
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_normformer.config import ConfigError
from megatron_normformer.parallel.random import get_all_rng_states, set_all_rng_states

LATEST = "latest"


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


def save_checkpoint(engine, run_dict: Dict, state: Dict, save_dir: str) -> str:
    """Save on every rank; ``state`` holds iteration / consumed_samples / consumed_tokens."""
    tag = tag_for(state["iteration"])
    rank = dist.get_rank()
    os.makedirs(save_dir, exist_ok=True)
    engine.save_checkpoint(save_dir, tag=tag, client_state=dict(state), save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    _atomic_write(os.path.join(tag_dir, f"rng_rank{rank:05d}.pt"),
                  lambda tmp: torch.save(get_all_rng_states(), tmp))
    if rank == 0:
        meta = dict(state, run=run_dict, world_size=dist.get_world_size())
        _atomic_text(os.path.join(tag_dir, "run.json"), json.dumps(meta, indent=1))
    dist.barrier()  # every rank's files are on disk before the pointer moves
    if rank == 0:
        _atomic_text(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return tag


def read_latest(load_dir: str) -> str:
    if not os.path.isdir(load_dir):
        raise ConfigError(f"--load {load_dir}: no such directory")
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        raise ConfigError(f"--load {load_dir}: no complete checkpoint (no '{LATEST}' file)")
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(load_dir, tag, "run.json")):
        raise ConfigError(f"--load {load_dir}: '{LATEST}' names {tag!r}, which has no run.json")
    return tag


def check_compatible(meta: Dict, run_dict: Dict, world_size: int, load_dir: str) -> None:
    """The checkpoint's model and layout must be this run's; the first difference is named."""
    saved, now = meta["run"], run_dict
    diffs = [f"{k}: checkpoint {saved['model'].get(k)!r} vs this run {v!r}"
             for k, v in now["model"].items()
             if k not in ("hidden_dropout", "attention_dropout") and saved["model"].get(k) != v]
    tp_saved = saved["parallel"]["tensor_model_parallel_size"]
    tp_now = now["parallel"]["tensor_model_parallel_size"]
    if tp_saved != tp_now:
        diffs.append(f"tensor_model_parallel_size: checkpoint {tp_saved} vs this run {tp_now}")
    stage_saved, stage_now = saved["ds"]["zero_stage"], now["ds"]["zero_stage"]
    if stage_saved != stage_now:
        diffs.append(f"zero_stage: checkpoint {stage_saved} vs this run {stage_now}")
    elif stage_now > 0 and meta["world_size"] != world_size:
        diffs.append(f"world size with ZeRO-{stage_now} partitions: checkpoint {meta['world_size']} "
                     f"vs this run {world_size}")
    if diffs:
        raise ConfigError(f"--load {load_dir}: checkpoint does not match this run: " + "; ".join(diffs))


def load_checkpoint(engine, run_dict: Dict, load_dir: str, load_optim: bool = True,
                    load_rng: bool = True) -> Optional[Dict]:
    """Restore everything; return the saved iteration / consumed_samples / consumed_tokens."""
    tag = read_latest(load_dir)
    tag_dir = os.path.join(load_dir, tag)
    with open(os.path.join(tag_dir, "run.json")) as f:
        meta = json.load(f)
    check_compatible(meta, run_dict, dist.get_world_size(), load_dir)
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
    return {k: meta[k] for k in ("iteration", "consumed_samples", "consumed_tokens")}
