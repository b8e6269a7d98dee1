"""Waits on torch's C++-extension build lock, reported as a start-up phase.

torch's ``FileBaton.wait`` polls its lock file forever and silently. A live JIT build keeps the
lock open until it removes it; an interrupted one leaves it behind, and then the wait never ends.
"""
from __future__ import annotations

import os

from megatron_normformer.runtime import lifecycle, phases, procfs


def build_lock_report(path: str) -> str:
    """Who holds torch's JIT-build lock ``path``: a build to wait for, or nobody (a build was
    interrupted and left it; waiting would last forever)."""
    holders = procfs.holders_of(path)
    if holders:
        return f"a build in process {', '.join(map(str, holders))} holds it; waiting for that build"
    return (f"no process on this machine holds it: a build was interrupted and left it behind; "
            f"remove {path} (this launch goes on at once)")


def report_build_lock_waits() -> None:
    """Make a wait on torch's build lock a start-up phase the watchdog reports, with the lock's
    holder or its absence (only once ``signals.install`` ran). Nothing this project runs
    JIT-builds an op (``deepspeed_repairs.skip_shm_comm_op``); this covers a DeepSpeed that
    would."""
    if lifecycle.current() is None:
        return
    from torch.utils import file_baton  # late: the entry scripts import runtime before torch

    original = file_baton.FileBaton.wait
    if getattr(original, "reports_to_watchdog", False):
        return

    def wait(self):
        path = os.path.abspath(self.lock_file_path)
        with phases.waiting(f"waiting for the C++ extension build lock {path}",
                            lambda: build_lock_report(path)):
            original(self)

    wait.reports_to_watchdog = True
    file_baton.FileBaton.wait = wait
