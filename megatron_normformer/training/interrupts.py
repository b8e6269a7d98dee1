"""Signals and waits of a launched trainer process (``pretrain_gpt.py``, ``pretrain_bert.py``).

SIGTERM and SIGINT mean different things over a process's life:

- start-up (imports, DeepSpeed, rendezvous, checkpoint loading, dataset indexes): the process
  ends at once with one line naming what it was doing, exit status 128 + the signal number.
  Nothing has been written that a later launch would wait on.
- training: the loop's ``StopFlag`` owns them: the step finishes, the run saves and exits 0.
- finishing (after the loop, up to the final barrier): ignored, exit 0 follows.
- failing (an error is being reported, ``failing``): the process ends at once, silently, with the
  error's exit status. The signal is then the launcher stopping the ranks after another one
  reported the same error; "SIGTERM during start-up" would only hide it.

Python runs signal handlers only between bytecodes of the main thread, which may sit in a native
call that never returns (a rendezvous waiting for a rank that never comes). So the handler does
nothing itself: Python's wakeup fd carries the signal number to a thread that acts on it.

Each start-up phase is named with what it waits for; a watchdog thread prints that when a phase
lasts longer than ``REPORT_AFTER`` seconds, so no launch waits in silence. ``install`` is called
by the entry points before anything heavy is imported; without it (training in-process, tests)
every function here is a no-op and the loop handles signals alone.

DataLoader workers are the trainer's to stop, not the scheduler's: ``quiet_workers_iter`` starts
them with SIGTERM/SIGINT ignored, so a signal sent to the whole process group (``scancel``,
``kill -- -PGID``, torchrun's and the deepspeed launcher's forwarding) reaches the trainer without
killing the workers under it. Being deaf to SIGTERM, they cannot be stopped the way
multiprocessing stops a process's children at interpreter exit: the trainer stops them itself
whenever its batches end, an error included (``data/loader.py``).
"""
from __future__ import annotations

import contextlib
import glob
import os
import signal
import threading
import time
from typing import Callable, Iterator, List, Optional, Union

from megatron_normformer.deepspeed_repairs import deepspeed_runner

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RUNNER_EXIT = "exit of the deepspeed launcher"
STOP_REASONS = ("SIGINT", "SIGTERM", RUNNER_EXIT)  # the loop agrees on the last one any rank has
REPORT_AFTER = 5.0  # seconds a start-up phase may last before it says what it waits for
REPORT_EVERY = 60.0  # then again this often

Hint = Union[str, Callable[[], str], None]


class _State:
    def __init__(self, program: str):
        self.program = program
        self.mode = "start-up"  # then "training", then "finishing"
        self.phase = "importing"
        self.hint: Hint = None
        self.since = time.monotonic()
        self.exit_code = 0  # in mode "failing"
        # why the trainer should stop, noticed here while it owned the signals: a signal its own
        # handler missed while being installed, or the deepspeed runner's exit
        self.received: Optional[str] = None


_state: Optional[_State] = None


def install(program: str) -> None:
    """Take SIGTERM/SIGINT for this process and start the two watcher threads (main thread only;
    a second call does nothing)."""
    global _state
    if _state is not None or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    _state = _State(program)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in SIGNALS:
        signal.signal(sig, _carried_by_wakeup_fd)
    threading.Thread(target=_watch_signals, args=(read_fd,), name="signal-watch", daemon=True).start()
    threading.Thread(target=_watch_phases, name="start-up-watchdog", daemon=True).start()
    runner = deepspeed_runner(_cmdline, _parent_of)  # the runner forwards no signal
    if runner is not None:
        threading.Thread(target=_watch_runner, args=runner, name="launcher-watch", daemon=True).start()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _watch_runner(launch: int, runner: int) -> None:
    """The runner gone (a signal to it alone) counts as SIGTERM: stop after the step and save."""
    while _parent_of(launch) == runner:
        time.sleep(1.0)
    state = _state
    if state.mode == "failing":
        os._exit(state.exit_code)
    if state.mode == "start-up":
        _say(f"{state.program}{_rank_tag()}: {RUNNER_EXIT} (pid {runner}) during start-up "
             f"({state.phase}): exiting before training, nothing saved")
        os._exit(128 + signal.SIGTERM)
    if state.mode == "training" and state.received is None:
        state.received = RUNNER_EXIT


def _carried_by_wakeup_fd(signum, frame) -> None:
    """The Python-level handler: only its presence matters (it makes Python write the signal number
    to the wakeup fd, and keeps SIGINT from raising KeyboardInterrupt)."""


def _rank_tag() -> str:
    rank = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
    return f" (rank {rank})" if rank is not None else ""


def _say(line: str) -> None:
    # os.write: the main thread may hold sys.stderr's lock in the middle of a print.
    os.write(2, (line + "\n").encode("utf-8", "replace"))


def _watch_signals(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        for signum in data:
            if signum not in SIGNALS:
                continue  # the wakeup fd carries every Python-handled signal (SIGCHLD too)
            state = _state
            name = signal.Signals(signum).name
            if state.mode == "failing":
                os._exit(state.exit_code)
            if state.mode == "start-up":
                _say(f"{state.program}{_rank_tag()}: {name} during start-up ({state.phase}): "
                     "exiting before training, nothing saved")
                os._exit(128 + signum)
            if state.mode == "training" and state.received is None:
                state.received = name


def _describe(hint: Hint) -> str:
    try:
        return hint() if callable(hint) else hint
    except Exception as e:  # noqa: BLE001 - a report must never break the run
        return f"(could not tell: {e})"


def _watch_phases() -> None:
    reported: Optional[tuple] = None
    next_report = REPORT_AFTER
    while _state.mode == "start-up":
        time.sleep(0.25)
        state = _state
        key = (state.phase, state.since)
        if key != reported:
            reported, next_report = key, REPORT_AFTER
        waited = time.monotonic() - state.since
        if state.mode == "start-up" and state.hint is not None and waited >= next_report:
            _say(f"{state.program}{_rank_tag()}: {state.phase} for {waited:.0f} s: "
                 f"{_describe(state.hint)}")
            next_report += REPORT_EVERY


def phase(description: str, hint: Hint = None) -> None:
    """Name what start-up does next. A phase with a ``hint`` is a wait: the hint (text, or a
    function the watchdog calls) says what for, printed when it lasts over REPORT_AFTER seconds."""
    if _state is not None and _state.mode == "start-up":
        _state.phase, _state.hint, _state.since = description, hint, time.monotonic()


@contextlib.contextmanager
def waiting(description: str, hint: Hint = None):
    """A phase inside another (a barrier): the outer one is current again afterwards."""
    if _state is None or _state.mode != "start-up":
        yield
        return
    outer = (_state.phase, _state.hint)
    phase(description, hint)
    try:
        yield
    finally:
        phase(*outer)


def trainer_takes_signals() -> None:
    """From here the training loop's StopFlag acts on SIGTERM/SIGINT (finish the step, save)."""
    if _state is not None:
        _state.mode = "training"


def received_during_training() -> Optional[str]:
    """A reason to stop that a watcher thread saw in training mode: a signal (by name) the loop's
    own handler missed while it was being installed, or the deepspeed runner's exit."""
    return None if _state is None else _state.received


def finishing() -> None:
    """The run is over and exits 0 next: later signals change nothing."""
    if _state is not None:
        _state.mode = "finishing"


def failing(exit_code: int) -> None:
    """An error is reported and the process exits with ``exit_code`` next: a signal ends it at
    once, with that status and nothing printed."""
    if _state is not None:
        _state.exit_code, _state.mode = exit_code, "failing"


# -- DataLoader workers -----------------------------------------------------------------------

def quiet_worker_init(worker_id: int) -> None:
    """worker_init_fn: ignore SIGTERM/SIGINT, then accept signals again (a pending one, sent
    while the worker started, is discarded by the ignore)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def quiet_workers_iter(loader) -> Iterator:
    """``iter(loader)`` with its worker processes deaf to SIGTERM/SIGINT (``loader`` built with
    ``worker_init_fn=quiet_worker_init``). The signals are blocked in this thread while the
    workers are forked, so a worker cannot die of one before its init function has run; the
    trainer's handler still sees them (another thread takes them meanwhile, or they stay pending
    here until unblocked)."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- JIT build locks --------------------------------------------------------------------------

def lock_holders(path: str) -> List[int]:
    """Pids of the processes on this machine that have ``path`` open (a live torch JIT build keeps
    its lock file open until it removes it)."""
    target = os.path.realpath(path)
    holders = []
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == target:
                holders.append(int(fd.split("/")[2]))
        except (OSError, ValueError):
            continue
    return sorted(set(holders))


def build_lock_report(path: str) -> str:
    """Who holds torch's JIT-build lock ``path``: a build to wait for, or nobody (a build was
    interrupted and left it; waiting would last forever)."""
    holders = lock_holders(path)
    if holders:
        return f"a build in process {', '.join(map(str, holders))} holds it; waiting for that build"
    return (f"no process on this machine holds it: a build was interrupted and left it behind; "
            f"remove {path} (this launch goes on at once)")


def report_build_lock_waits() -> None:
    """Make a wait on torch's C++-extension build lock (``FileBaton.wait``, which polls forever
    and silently) a start-up phase the watchdog reports, with the lock's holder or its absence.
    Nothing this project runs JIT-builds an op (``deepspeed_repairs.skip_shm_comm_op``); this
    covers a DeepSpeed that would."""
    if _state is None:
        return
    from torch.utils import file_baton

    original = file_baton.FileBaton.wait
    if getattr(original, "reports_to_watchdog", False):
        return

    def wait(self):
        path = os.path.abspath(self.lock_file_path)
        with waiting(f"waiting for the C++ extension build lock {path}",
                     lambda: build_lock_report(path)):
            original(self)

    wait.reports_to_watchdog = True
    file_baton.FileBaton.wait = wait
