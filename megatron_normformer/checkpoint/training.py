"""Training checkpoints: DeepSpeed's model/optimizer/schedule files plus what exact resume needs.

Layout of ``--save DIR``::

    DIR/latest                      tag of the newest complete checkpoint
    DIR/iter_0000010/               DeepSpeed's files (model, optimizer, ZeRO partitions, schedule)
    DIR/iter_0000010/run.json       run config, iteration, consumed samples/tokens (rank 0)
    DIR/iter_0000010/rng_rank00003.pt   every RNG state of global rank 3 (one file per rank)
    DIR/iter_0000010/universal/     the layout-independent state (``checkpoint/universal.py``)

DeepSpeed keeps ``client_state`` from rank 0 only, but every rank has its own RNG streams (the TP
dropout stream differs per TP rank), hence one file per rank.

Every rank writes into ``DIR/.tmp.iter_0000010``; once all have written and fsynced their share,
rank 0 renames it into place and moves ``latest`` (``checkpoint/atomic.py``), so a killed save
leaves ``latest`` on a complete checkpoint, never on a mix of two saves. A save that fails on any
rank (a full disk) fails on every rank with one message, and its partial directory is removed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_normformer.checkpoint import atomic
from megatron_normformer.checkpoint.atomic import LATEST, REPLACED, CheckpointError  # noqa: F401 - loop.py takes it from here
from megatron_normformer.checkpoint.universal import check_same_model, load_universal, save_universal
from megatron_normformer.config import ConfigError
from megatron_normformer.parallel.random import get_all_rng_states, set_all_rng_states

def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _first_failure(message: Optional[str]) -> Optional[str]:
    """Every rank's ``message`` (None: this rank succeeded) gathered: None if all succeeded, else
    the first failing rank's, naming that rank unless every rank failed alike. A collective, hence
    also a barrier."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return None
    rank, first = failed[0]
    return first if len(set(messages)) == 1 else f"{first} (rank {rank})"


def _every_rank(step: Callable[[], None], path: str) -> Optional[str]:
    """Run ``step`` on every rank; what went wrong on the first rank where it failed, or None."""
    try:
        step()
        message = None
    except Exception as e:  # noqa: BLE001 - reported on every rank by _first_failure
        message = atomic.describe_failure(e, path)
    return _first_failure(message)


def prepare_save_dir(save_dir: str) -> List[str]:
    """At start, on every rank: ``save_dir`` is created and written into (ConfigError if it cannot
    be, on every rank), then rank 0 repairs what killed saves left there. Returns rank 0's lines
    for the log."""
    failure = _first_failure(atomic.check_writable(save_dir, dist.get_rank()))
    if failure:
        raise ConfigError(failure)
    done: List[str] = []

    def repair():
        if dist.get_rank() == 0:
            done.extend(atomic.repair(save_dir))

    failure = _every_rank(repair, save_dir)
    if failure:
        raise ConfigError(f"--save {save_dir}: could not clean up after a killed save: {failure}")
    return done


@dataclass
class UniversalSource:
    """What the layout-independent part of a save reads (``checkpoint/universal.py``)."""

    module: torch.nn.Module
    """The model, or this stage's PipelineModule."""
    pstate: object
    """The parallel layout the module is cut by (``parallel/state.py``)."""
    model_config: object
    """The run's ModelConfig, stored so that any layout can rebuild the full tensors."""


def save_checkpoint(engine, run_dict: Dict, state: Dict, save_dir: str,
                    universal: Optional[UniversalSource] = None, optim: bool = True,
                    rng: bool = True) -> str:
    """Save on every rank; ``state`` holds iteration / consumed_samples / consumed_tokens.

    ``universal`` also writes the layout-independent state that lets the checkpoint resume into
    another (TP, PP, ZeRO) layout. Raises CheckpointError on every
    rank if the save failed on any; the previous checkpoints are then as they were.
    ``optim`` False (``--no-save-optim``): the weights only, in the layout-independent form (which
    ``universal`` must then give), no DeepSpeed files; ``rng`` False (``--no-save-rng``): no RNG
    states.
    """
    tag = tag_for(state["iteration"])
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = atomic.tmp_dir(save_dir, tag)
    final = os.path.join(save_dir, tag)

    def write():
        # DeepSpeed writes into save_dir/tag: the temporary directory's name is the tag it gets.
        if optim:
            engine.save_checkpoint(save_dir, tag=os.path.basename(tmp), client_state=dict(state),
                                   save_latest=False)
        os.makedirs(tmp, exist_ok=True)
        if rng:
            torch.save(get_all_rng_states(), os.path.join(tmp, f"rng_rank{rank:05d}.pt"))
        if universal is not None:
            save_universal(engine, universal.module, universal.pstate, universal.model_config,
                           tmp, optimizer=optim)
        if rank == 0:
            meta = dict(state, run=run_dict, world_size=world)
            if not optim:
                meta["universal_only"] = True  # --load goes through the universal path
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump(meta, f, indent=1)

    def publish():
        if rank == 0:
            atomic.publish(save_dir, tag)

    for step in (write, lambda: atomic.fsync_tree(tmp, rank, world), publish):
        failure = _every_rank(step, final)
        if failure:
            if rank == 0:
                atomic.discard(tmp)
            raise atomic.failed(save_dir, tag, failure)
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
        tag = atomic.read_latest(load_dir)
        if tag is None and os.path.isfile(os.path.join(load_dir, "config.json")):
            raise ConfigError(f"--load {load_dir}: a Hugging Face directory, not a training checkpoint; "
                              f"make one with tools/convert_checkpoint.py --load {load_dir} --save DIR")
        if tag is None:
            raise ConfigError(f"--load {load_dir}: no complete checkpoint (no '{LATEST}' file)")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        if os.path.isdir(os.path.join(load_dir, REPLACED + tag)):
            raise ConfigError(
                f"--load {load_dir}: a save replacing {tag!r} was killed before the new version "
                f"was in place; the previous one is {REPLACED + tag}: rename it to {tag}, or start "
                f"a run with --save {load_dir}, which does that")
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
    check_same_model(saved["model"], now["model"], load_dir)
    if meta.get("universal_only"):
        return ["no DeepSpeed files: a converted checkpoint, or saved with --no-save-optim"]
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


@dataclass
class LoadPlan:
    """A checkpoint about to be loaded, read and checked before anything changes in the engine."""

    load_dir: str
    tag: str
    meta: Dict
    """The checkpoint's run.json."""
    diffs: List[str]
    """Why DeepSpeed's own files cannot be loaded here; empty when they can."""
    load_optim: bool
    load_rng: bool
    optimizer_saved: bool
    notes: List[str] = field(default_factory=list)
    """What the load does instead of what was asked, said once by rank 0."""

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.load_dir, self.tag)

    @property
    def state(self) -> Dict:
        """The saved iteration / consumed_samples / consumed_tokens."""
        return {k: self.meta[k] for k in ("iteration", "consumed_samples", "consumed_tokens")}

    @property
    def needs_optimizer_state(self) -> bool:
        """Whether the engine must hold optimizer state before ``load_checkpoint``: the
        layout-independent load overwrites that state but cannot create it. One optimizer step at
        learning rate 0 makes DeepSpeed create it (``training/loop.py``, ``warmup_step``)."""
        return bool(self.diffs) and self.load_optim and self.optimizer_saved


def plan_load(run, load_dir: str, load_optim: bool = True, load_rng: bool = True) -> LoadPlan:
    """Read and check the newest checkpoint in ``load_dir`` against this run: a model that differs,
    or another ``--optimizer``, is a ConfigError before the engine is touched."""
    tag = read_latest(load_dir)
    with open(os.path.join(load_dir, tag, "run.json")) as f:
        meta = json.load(f)
    diffs = layout_differences(meta, run.to_dict(), dist.get_world_size(), load_dir)
    saved = meta["run"].get("ckpt", {})
    optimizer_saved = not saved.get("no_save_optim", False)
    kind = meta["run"].get("optim", {}).get("optimizer", "adam")
    if load_optim and optimizer_saved and kind != run.optim.optimizer:
        raise ConfigError(f"--load {load_dir}: the checkpoint holds the state of --optimizer {kind}, "
                          f"this run's is {run.optim.optimizer}; add --no-load-optim to start the "
                          "optimizer afresh")
    plan = LoadPlan(load_dir, tag, meta, diffs, load_optim, load_rng, optimizer_saved)
    if load_optim and not optimizer_saved:
        plan.notes.append("saved with --no-save-optim: the optimizer starts afresh (no moments, "
                          f"step 0), the learning rate going on from iteration {meta['iteration']}")
    if load_rng and saved.get("no_save_rng", False):
        plan.notes.append(f"saved with --no-save-rng: the RNG streams start from --seed {run.train.seed}")
        plan.load_rng = False
    return plan


def load_checkpoint(e, run, pstate, plan: LoadPlan) -> Dict:
    """Restore everything ``plan`` says; return the saved iteration / consumed_samples /
    consumed_tokens.

    In the layout that wrote it, DeepSpeed's files are loaded and the resume is bit-exact. In any
    other layout the layout-independent state is loaded instead (weights, Adam moments and step,
    LR schedule position, data position); RNG streams restart from the seed, since dropout
    streams are per-rank. There the engine must already hold optimizer state when
    ``plan.needs_optimizer_state``.
    """
    load_dir, tag, tag_dir = plan.load_dir, plan.tag, plan.tag_dir
    engine, state = e.deepspeed, plan.state
    for note in plan.notes if dist.get_rank() == 0 else ():
        print(f"> --load {load_dir}: {note}", flush=True)
    if plan.diffs:
        if dist.get_rank() == 0:
            print(f"> --load {load_dir}: layout changed ({'; '.join(plan.diffs)}); loading the "
                  "layout-independent state", flush=True)
        load_universal(engine, e.module, pstate, run.model, tag_dir, plan.needs_optimizer_state)
        if plan.load_optim:
            e.schedule.load_state_dict({"num_steps": state["iteration"],
                                        "num_samples": state["consumed_samples"]})
        engine.global_steps = state["iteration"]
        engine.global_samples = state["consumed_samples"]
        return state
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=plan.load_optim,
                                     load_lr_scheduler_states=plan.load_optim,
                                     load_module_only=not plan.load_optim)
    if path is None:
        raise ConfigError(f"--load {load_dir}: DeepSpeed found no checkpoint files under {tag}")
    if plan.load_rng:
        rng_file = os.path.join(tag_dir, f"rng_rank{dist.get_rank():05d}.pt")
        if not os.path.isfile(rng_file):
            raise ConfigError(f"--load {load_dir}: {rng_file} missing (saved with another world "
                              "size?); pass --no-load-rng to start fresh RNG streams")
        set_all_rng_states(torch.load(rng_file, weights_only=False))
    return state
