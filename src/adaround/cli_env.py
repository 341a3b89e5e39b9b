"""What the `adaround` command takes from the machine: a thread count from its load."""

from __future__ import annotations

import os

import torch


def choose_threads() -> int | None:
    """Threads for torch: the cores not busy with other work (1-minute load average), or
    None to keep torch's choice where OMP_NUM_THREADS is set or the load is unknown. On a
    busy machine one thread per free core avoids oversubscription (measured 6x slower with
    two threads on a 2-core machine running other work)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))
