"""Where a launched trainer process is in its life, read by the threads that watch it.

A process has at most one :class:`Lifecycle`, made by ``signals.install`` (entry scripts only).
Without one (training in-process, tests, tools) every function of ``signals``, ``phases`` and
``build_locks`` does nothing and the training loop handles signals alone.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

Hint = Union[str, Callable[[], str], None]
"""What a start-up phase waits for: text, or a function the watchdog calls when it reports."""


@dataclass
class Lifecycle:
    """The state the signal watcher and the start-up watchdog act on; the main thread moves it
    on."""

    program: str
    """The entry script's name, first on every line printed."""
    mode: str = "start-up"
    """start-up, then training, then finishing; failing once an error is reported."""
    phase: str = "importing"
    """What start-up does now."""
    hint: Hint = None
    """What the phase waits for (None: not a wait, never reported)."""
    since: float = field(default_factory=time.monotonic)
    """When the phase began (time.monotonic)."""
    exit_code: int = 0
    """The status to exit with in mode failing."""
    received: Optional[str] = None
    """Why the trainer should stop, noticed by a watcher in mode training: a signal the loop's own
    handler missed while it was installed, or the deepspeed runner's exit."""

    def say(self, text: str) -> None:
        """One line on stderr, naming the program and the rank."""
        rank = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        tag = f" (rank {rank})" if rank is not None else ""
        # os.write: the main thread may hold sys.stderr's lock in the middle of a print.
        os.write(2, f"{self.program}{tag}: {text}\n".encode("utf-8", "replace"))


_current: Optional[Lifecycle] = None


def begin(program: str) -> Optional[Lifecycle]:
    """This process's Lifecycle, new; None when it has one already."""
    global _current
    if _current is not None:
        return None
    _current = Lifecycle(program)
    return _current


def current() -> Optional[Lifecycle]:
    """This process's Lifecycle, None unless ``signals.install`` ran."""
    return _current


def in_mode(mode: str) -> Optional[Lifecycle]:
    """This process's Lifecycle when it is in ``mode``, else None."""
    return _current if _current is not None and _current.mode == mode else None
