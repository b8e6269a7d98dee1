"""The body of ``pretrain_gpt.py`` and ``pretrain_bert.py``: parse, build, run. The entry point
names its task (``training/tasks.py``); errors a user can cause end in one message."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, NoReturn, Optional, Set

import torch.distributed as dist

from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
from megatron_normformer.config import ConfigError
from megatron_normformer.data import TokenizerError, build_tokenizer
from megatron_normformer.data.loader import DataError
from megatron_normformer.parallel.state import (
    ParallelState,
    initialize_distributed,
    read_launch_env,
)
from megatron_normformer.training import ds_config as dsc
from megatron_normformer.training import interrupts
from megatron_normformer.training.loop import TrainingError, train
from megatron_normformer.training.tasks import get_task


def explicit_dests(parser, argv: List[str]) -> Set[str]:
    """Destinations of the flags written on the command line (not left at their defaults)."""
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


def _tokenizer_vocab(args) -> Optional[int]:
    kind = args.tokenizer_type
    if kind is None:
        if args.mock_data or args.vocab_size is not None:
            return None  # NullTokenizer semantics: --vocab-size sizes the model
        raise ConfigError("--tokenizer-type is required with --data-path (or give --vocab-size for "
                          "data made with the NullTokenizer)")
    try:
        return build_tokenizer(kind, args.tokenizer_model, args.vocab_file, args.merge_file,
                               args.vocab_size).vocab_size
    except (TokenizerError, OSError) as e:
        raise ConfigError(str(e)) from None


def resolve(parser, argv: List[str], task=None):
    """(args, run config, user DeepSpeed config or None); ConfigError on a bad combination."""
    task = get_task(task)
    args = parser.parse_args(argv)
    if args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"  # what Megatron-DeepSpeed's GPT scripts rely on
    vocab = _tokenizer_vocab(args)
    run = run_config_from_args(args, vocab, bidirectional=task.bidirectional)
    task.validate(run)
    user = None
    if run.ds.deepspeed_config:
        user = dsc.load_user_config(run.ds.deepspeed_config)
    return args, run, user, explicit_dests(parser, argv)


def layout(run, user, explicit, world_size: int):
    """Reconcile with the user's DeepSpeed config and return (ds config dict, dp, gas)."""
    dp = run.parallel.data_parallel_size(world_size)
    if user is not None:
        dsc.reconcile(run, user, {"--" + d.replace("_", "-") for d in explicit}, dp)
    dp, gas, _ = run.batch_layout(world_size)
    return dsc.build(run, dp, gas, user), dp, gas


def train_resolved(run, user=None, explicit=(), task=None):
    """Train on the already-initialised world; return the loop's summary."""
    ds, _, _ = layout(run, user, explicit, dist.get_world_size())
    pstate = ParallelState(run.parallel.tensor_model_parallel_size,
                           run.parallel.pipeline_model_parallel_size, run.parallel.sequence_parallel)
    return train(run, pstate, ds, run.model.vocab_size, task)


def train_from_argv(argv: List[str], task=None) -> Dict:
    """In-process training from flags (tests, notebooks): ConfigError propagates. ``task``:
    ``"gpt"`` (default) or ``"bert"``."""
    task = get_task(task)
    args, run, user, explicit = resolve(build_pretrain_parser(task.description), list(argv), task)
    return train_resolved(run, user, explicit, task)


def main(argv: Optional[List[str]] = None, task=None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = get_task(task)
    parser = build_pretrain_parser(task.description)
    try:
        interrupts.phase("reading the flags and the tokenizer")
        args, run, user, explicit = resolve(parser, argv, task)
        if args.dry_run:
            world = read_launch_env().world_size
            ds, dp, gas = layout(run, user, explicit, world)
            print(json.dumps(dict(run.to_dict(), task=task.name, world_size=world, data_parallel_size=dp,
                                  gradient_accumulation_steps=gas,
                                  train_iters=run.train_iters(ds["train_batch_size"]),
                                  deepspeed_config=ds), indent=1))
            return {}
    except ConfigError as e:
        parser.error(str(e))

    try:
        initialize_distributed(timeout_minutes=run.train.distributed_timeout_minutes)
        summary = train_resolved(run, user, explicit, task)
    except (ConfigError, TrainingError, DataError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif not getattr(e, "every_rank_knows", True):
            print(f"error (rank {dist.get_rank()}): {e}", file=sys.stderr, flush=True)
        os._exit(2 if isinstance(e, ConfigError) else 1)  # other ranks may be blocked in collectives
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another may still need it
    return summary


def launch(task=None) -> NoReturn:
    """The entry point of pretrain_gpt.py and pretrain_bert.py: ``main``, then a hard exit.

    After a finished run every file is written and closed, but a normal interpreter shutdown can
    still be aborted by native threads of the communication libraries (gloo, DeepSpeed's comm ops):
    "terminate called without an active exception", exit code -6, for a run that succeeded. The
    process therefore leaves with os._exit once its output is flushed.
    """
    main(task=task)
    interrupts.finishing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
