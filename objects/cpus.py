"""How many CPUs this process may use (a module of its own: objects.bulk and objects.store use it)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: whether helper threads or processes can run beside it."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
