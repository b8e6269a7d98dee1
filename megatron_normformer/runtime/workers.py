"""DataLoader workers deaf to the signals the trainer takes.

DataLoader workers are the trainer's to stop, not the scheduler's: ``quiet_workers_iter`` starts
them with SIGTERM/SIGINT ignored, so a signal sent to the whole process group (``scancel``,
``kill -- -PGID``, torchrun's and the deepspeed launcher's forwarding) reaches the trainer without
killing the workers under it. Being deaf to SIGTERM, they cannot be stopped the way
multiprocessing stops a process's children at interpreter exit: the trainer stops them itself
whenever its batches end, an error included (``data/loader.py``).
"""
from __future__ import annotations

import signal
import threading
from typing import Iterator

from megatron_normformer.runtime.signals import SIGNALS


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
