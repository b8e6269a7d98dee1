"""Named start-up phases, and the watchdog that says what a long one waits for.

Each phase of start-up (imports, rendezvous, checkpoint loading, dataset indexes) is named with
what it waits for; ``watch`` prints that when a phase lasts longer than ``REPORT_AFTER`` seconds,
so no launch waits in silence.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

from megatron_normformer.runtime import lifecycle
from megatron_normformer.runtime.lifecycle import Hint, Lifecycle

REPORT_AFTER = 5.0  # seconds a start-up phase may last before it says what it waits for
REPORT_EVERY = 60.0  # then again this often


def phase(description: str, hint: Hint = None) -> None:
    """Name what start-up does next. A phase with a ``hint`` is a wait: the hint (text, or a
    function the watchdog calls) says what for, printed when it lasts over REPORT_AFTER seconds."""
    life = lifecycle.in_mode("start-up")
    if life is not None:
        life.phase, life.hint, life.since = description, hint, time.monotonic()


@contextlib.contextmanager
def waiting(description: str, hint: Hint = None):
    """A phase inside another (a barrier): the outer one is current again afterwards."""
    life = lifecycle.in_mode("start-up")
    if life is None:
        yield
        return
    outer = (life.phase, life.hint)
    phase(description, hint)
    try:
        yield
    finally:
        phase(*outer)


def _describe(hint: Hint) -> str:
    try:
        return hint() if callable(hint) else hint
    except Exception as e:  # noqa: BLE001 - a report must never break the run
        return f"(could not tell: {e})"


def watch(life: Lifecycle) -> None:
    """The watchdog thread's body: report each waiting phase that lasts, until start-up ends."""
    reported: Optional[tuple] = None
    next_report = REPORT_AFTER
    while life.mode == "start-up":
        time.sleep(0.25)
        key = (life.phase, life.since)
        if key != reported:
            reported, next_report = key, REPORT_AFTER
        waited = time.monotonic() - life.since
        if life.mode == "start-up" and life.hint is not None and waited >= next_report:
            life.say(f"{life.phase} for {waited:.0f} s: {_describe(life.hint)}")
            next_report += REPORT_EVERY
