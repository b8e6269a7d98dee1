"""SIGTERM and SIGINT of a launched trainer process (``pretrain_gpt.py``, ``pretrain_bert.py``).

They mean different things over the process's life (``lifecycle.Lifecycle.mode``):

- start-up (imports, DeepSpeed, rendezvous, checkpoint loading, dataset indexes): the process
  ends at once with one line naming what it was doing (``phases``), exit status 128 + the signal
  number. Nothing has been written that a later launch would wait on.
- training: the loop's ``StopFlag`` owns them: the step finishes, the run saves and exits 0.
- finishing (after the loop, up to the final barrier): ignored, exit 0 follows.
- failing (an error is being reported, ``failing``): the process ends at once, silently, with the
  error's exit status. The signal is then the launcher stopping the ranks after another one
  reported the same error; "SIGTERM during start-up" would only hide it.

Python runs signal handlers only between bytecodes of the main thread, which may sit in a native
call that never returns (a rendezvous waiting for a rank that never comes). So the handler does
nothing itself: Python's wakeup fd carries the signal number to a thread that acts on it.
``install`` is called by the entry points before anything heavy is imported; without it every
function here is a no-op and the loop handles signals alone.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional, Tuple

from megatron_normformer.runtime import lifecycle, phases, procfs
from megatron_normformer.runtime.lifecycle import Lifecycle

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RUNNER_EXIT = "exit of the deepspeed launcher"
STOP_REASONS = ("SIGINT", "SIGTERM", RUNNER_EXIT)  # the loop agrees on the last one any rank has

FindRunner = Callable[[Callable[[int], str], Callable[[int], Optional[int]]],
                      Optional[Tuple[int, int]]]
"""(cmdline, parent_of) -> (the launch process's pid, its runner's pid) or None, as
``deepspeed_repairs.deepspeed_runner``."""


def install(program: str, find_runner: Optional[FindRunner] = None) -> None:
    """Take SIGTERM/SIGINT for this process and start the signal watcher and the start-up
    watchdog (main thread only; a second call does nothing). ``find_runner`` names a launcher
    that forwards no signal: its exit then counts as a SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return
    life = lifecycle.begin(program)
    if life is None:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in SIGNALS:
        signal.signal(sig, _carried_by_wakeup_fd)
    threading.Thread(target=_watch_signals, args=(life, read_fd), name="signal-watch",
                     daemon=True).start()
    threading.Thread(target=phases.watch, args=(life,), name="start-up-watchdog",
                     daemon=True).start()
    runner = find_runner(procfs.cmdline, procfs.parent_of) if find_runner is not None else None
    if runner is not None:
        threading.Thread(target=_watch_runner, args=(life, *runner), name="launcher-watch",
                         daemon=True).start()


def _carried_by_wakeup_fd(signum, frame) -> None:
    """The Python-level handler: only its presence matters (it makes Python write the signal number
    to the wakeup fd, and keeps SIGINT from raising KeyboardInterrupt)."""


def _act(life: Lifecycle, reason: str, exit_code: int, what: str) -> None:
    """What a stop request ``reason`` does in the current mode (exit_code: its start-up status)."""
    if life.mode == "failing":
        os._exit(life.exit_code)
    if life.mode == "start-up":
        life.say(f"{what} during start-up ({life.phase}): exiting before training, nothing saved")
        os._exit(exit_code)
    if life.mode == "training" and life.received is None:
        life.received = reason


def _watch_signals(life: Lifecycle, read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        for signum in data:
            if signum not in SIGNALS:
                continue  # the wakeup fd carries every Python-handled signal (SIGCHLD too)
            name = signal.Signals(signum).name
            _act(life, name, 128 + signum, name)


def _watch_runner(life: Lifecycle, launch: int, runner: int) -> None:
    """The runner gone (a signal to it alone) counts as SIGTERM: stop after the step and save."""
    while procfs.parent_of(launch) == runner:
        time.sleep(1.0)
    _act(life, RUNNER_EXIT, 128 + signal.SIGTERM, f"{RUNNER_EXIT} (pid {runner})")


def trainer_takes_signals() -> None:
    """From here the training loop's StopFlag acts on SIGTERM/SIGINT (finish the step, save)."""
    life = lifecycle.current()
    if life is not None:
        life.mode = "training"


def received_during_training() -> Optional[str]:
    """A reason to stop that a watcher thread saw in training mode: a signal (by name) the loop's
    own handler missed while it was being installed, or the deepspeed runner's exit."""
    life = lifecycle.current()
    return None if life is None else life.received


def finishing() -> None:
    """The run is over and exits 0 next: later signals change nothing."""
    life = lifecycle.current()
    if life is not None:
        life.mode = "finishing"


def failing(exit_code: int) -> None:
    """An error is reported and the process exits with ``exit_code`` next: a signal ends it at
    once, with that status and nothing printed."""
    life = lifecycle.current()
    if life is not None:
        life.exit_code, life.mode = exit_code, "failing"
