"""Whether a process still lives: one check for every place that asks (dead workers, the promotion claim)."""

from __future__ import annotations

import psutil


def alive(pid: int, since) -> bool:
    """Whether the process that started at or before `since` (a trial's start) still runs as `pid`."""
    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:  # access denied: it exists
        return True
    return since is None or created <= since.timestamp() + 1.0  # a newer process reused the pid
