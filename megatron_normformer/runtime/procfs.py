"""Facts about processes on this machine, read from /proc (Linux)."""
from __future__ import annotations

import glob
import os
from typing import List, Optional


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid``, None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name in parentheses may hold spaces and parentheses itself
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def holders_of(path: str) -> List[int]:
    """Pids of the processes on this machine that have ``path`` open."""
    target = os.path.realpath(path)
    holders = []
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == target:
                holders.append(int(fd.split("/")[2]))
        except (OSError, ValueError):
            continue
    return sorted(set(holders))
