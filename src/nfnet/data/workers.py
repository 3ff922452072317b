"""How many loader worker processes this machine can run usefully."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a job scheduler narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def usable_workers(requested: int) -> int:
    """`requested` loader workers, at most one per usable core: more only add processes that wait
    for a core (and PyTorch warns about each loader that asks for them)."""
    return max(0, min(int(requested), usable_cores()))
