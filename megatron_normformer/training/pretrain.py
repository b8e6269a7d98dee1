"""The body of ``pretrain_gpt.py`` and ``pretrain_bert.py``: parse, build, run. The entry point
names its task (``training/tasks.py``).

Every error ends the launch with one line on the user's terminal, ``pretrain_gpt.py: error: ...``,
under any launcher. torchrun, the deepspeed launcher and mpirun stop every rank as soon as one
exits with an error (srun does with ``--kill-on-bad-exit``), so a rank that leaves first can take
another's unprinted line with it. Hence the order:

- an error every rank finds (a flag, a checkpoint that does not match, a missing file, a NaN loss)
  is printed by rank 0 alone; the other ranks wait for that, up to ``REPORT_WAIT`` seconds. After
  the rendezvous rank 0 says so through the rendezvous store and stays until every rank has
  heard it (under every launcher but torchrun the store lives in rank 0's process); before it,
  the launcher ends the other ranks once rank 0 has exited. A rank that waits in vain (rank 0
  never found the error, or srun does not stop the step) prints the line itself, naming its rank;
- an error only some ranks can see (a bad batch, an unexpected exception, printed with its
  traceback) is printed by each rank that has it, naming the rank.

The process then leaves with ``os._exit``: the training loop has already stopped its DataLoader
workers and closed its metrics files on the way out (``training/loop.py``), other ranks may be
blocked in collectives that a barrier or an orderly shutdown would wait on, and the communication
libraries' native threads can abort a normal interpreter exit (see ``launch``).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from typing import Dict, List, NoReturn, Optional, Set, Tuple, Union

import torch.distributed as dist

from megatron_normformer.arguments import build_pretrain_parser, run_config_from_args
from megatron_normformer.config import ConfigError
from megatron_normformer.config import ds_config as dsc
from megatron_normformer.data.tokenizers import tokenizer_from_args
from megatron_normformer.data.loader import DataError
from megatron_normformer.parallel.state import ParallelState, initialize_distributed
from megatron_normformer.runtime import phases, signals
from megatron_normformer.runtime.launch_env import read_launch_env
from megatron_normformer.training.loop import RunSummary, TrainingError, train
from megatron_normformer.training.tasks import Task, get_task


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
    if args.tokenizer_type is None:
        if args.mock_data or args.vocab_size is not None:
            return None  # NullTokenizer semantics: --vocab-size sizes the model
        raise ConfigError("--tokenizer-type is required with --data-path (or give --vocab-size for "
                          "data made with the NullTokenizer)")
    return tokenizer_from_args(args).vocab_size


def resolve(parser, argv: List[str], task: Union[None, str, Task] = None):
    """(args, run config, user DeepSpeed config or None, the destinations of the flags written on
    the command line); ConfigError on a bad combination."""
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


def train_resolved(run, user, explicit, task: Task) -> RunSummary:
    """Train on the already-initialised world; return the loop's summary."""
    ds, _, _ = layout(run, user, explicit, dist.get_world_size())
    pstate = ParallelState(run.parallel.tensor_model_parallel_size,
                           run.parallel.pipeline_model_parallel_size, run.parallel.sequence_parallel)
    return train(run, pstate, ds, run.model.vocab_size, task)


def train_from_argv(argv: List[str], task: Union[None, str, Task] = None) -> RunSummary:
    """In-process training from flags (tests, notebooks): ConfigError propagates. ``task``:
    ``"gpt"`` (default) or ``"bert"``."""
    task = get_task(task)
    args, run, user, explicit = resolve(build_pretrain_parser(task.description), list(argv), task)
    return train_resolved(run, user, explicit, task)


def one_line_errors(parser):
    """``parser`` with argparse's own errors (an unknown flag, a malformed value) raised as
    ConfigError, reported like every other error: one line, not ~100 lines of usage first."""
    def error(message: str) -> NoReturn:
        raise ConfigError(message)

    parser.error = error
    return parser


def main(argv: Optional[List[str]] = None, task: Union[None, str, Task] = None
         ) -> Union[RunSummary, Dict]:
    """The entry points' body; the summary of the run, or {} after ``--dry-run``. ``task``
    (a name or a task; GPT when None) is resolved here, once."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task = get_task(task)
    parser = one_line_errors(build_pretrain_parser(task.description))
    try:
        phases.phase("reading the flags and the tokenizer")
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
        fail(parser.prog, f"{e} (see --help)", 2)
    except Exception as e:  # noqa: BLE001 - reported, with its traceback, like any error
        fail(parser.prog, f"{type(e).__name__}: {e}", 1, every_rank_knows=False,
             details=traceback.format_exc())

    try:
        initialize_distributed(timeout_minutes=run.train.distributed_timeout_minutes)
        summary = train_resolved(run, user, explicit, task)
    except (ConfigError, TrainingError, DataError) as e:
        fail(parser.prog, str(e), 2 if isinstance(e, ConfigError) else 1,
             every_rank_knows=getattr(e, "every_rank_knows", True))
    except Exception as e:  # noqa: BLE001 - reported, with its traceback, like any error
        fail(parser.prog, f"{type(e).__name__}: {e}", 1, every_rank_knows=False,
             details=traceback.format_exc())
    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another may still need it
    return summary


# -- errors -----------------------------------------------------------------------------------

REPORT_WAIT = 30.0  # seconds a rank waits for rank 0 to report an error both found


def fail(program: str, message: str, exit_code: int, every_rank_knows: bool = True,
         details: str = "") -> NoReturn:
    """End the launch with the error line ``program: error: message`` (``details``, a traceback,
    above it) and ``exit_code``, in the order the module docstring gives."""
    rank, world = _rank_and_world()
    if world > 1 and rank != 0 and every_rank_knows:
        signals.failing(exit_code)  # the launcher ending this rank now follows rank 0's report
        if _reported_by_rank_0():
            _exit(exit_code)
        every_rank_knows = False  # rank 0 did not report it: this rank does
    who = program if world == 1 or every_rank_knows else f"{program} (rank {rank})"
    sys.stdout.flush()
    print(f"{details}{who}: error: {message}", file=sys.stderr, flush=True)
    signals.failing(exit_code)
    if world > 1 and every_rank_knows and dist.is_initialized():
        _tell_the_other_ranks(world)
    _exit(exit_code)


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        launch = read_launch_env()
    except ConfigError:
        return 0, 1  # a launch environment too broken to tell: speak
    return launch.rank, launch.world_size


def _key(name: str) -> str:
    # torchrun keeps its store over restarts (--max-restarts): keys of their own for each attempt
    return f"megatron_normformer/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store(timeout: float):
    """A client of the rendezvous store (torchrun's, or rank 0's under the other launchers)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)


def _reported_by_rank_0() -> bool:
    """Wait up to REPORT_WAIT seconds for rank 0's report; False without it."""
    if not dist.is_initialized():
        # Before the rendezvous there is no store: rank 0's exit makes the launcher end this
        # process (signals.failing) before the wait is over.
        time.sleep(REPORT_WAIT)
        return False
    deadline = time.monotonic() + REPORT_WAIT
    try:
        store = _store(REPORT_WAIT)
        store.wait([_key("error-reported")],
                   datetime.timedelta(seconds=max(deadline - time.monotonic(), 1)))
        store.add(_key("error-heard"), 1)
        return True
    except Exception:  # noqa: BLE001 - no word from rank 0 (timeout, its store gone): report here
        return False


def _tell_the_other_ranks(world: int) -> None:
    """Rank 0's word that the error is printed, then a wait (up to REPORT_WAIT seconds) until
    every other rank has heard it: except under torchrun, the store lives in rank 0's process and
    ends with it."""
    deadline = time.monotonic() + REPORT_WAIT
    try:
        store = _store(5.0)
        store.set(_key("error-reported"), "1")
        while store.add(_key("error-heard"), 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the others report it themselves after REPORT_WAIT
        pass


def _exit(exit_code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def launch(task=None) -> NoReturn:
    """The entry point of pretrain_gpt.py and pretrain_bert.py: ``main``, then a hard exit.

    After a finished run every file is written and closed, but a normal interpreter shutdown can
    still be aborted by native threads of the communication libraries (gloo, DeepSpeed's comm ops):
    "terminate called without an active exception", exit code -6, for a run that succeeded. The
    process therefore leaves with os._exit once its output is flushed.
    """
    main(task=task)
    signals.finishing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
