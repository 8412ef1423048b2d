"""Link bandwidths for the predicted stall time: common links, and this machine's disk, measured."""

from __future__ import annotations

import time

import numpy as np
import torch

from moeflow.model.checkpoint import Checkpoint
from moeflow.tools.profile.report import MEASURED_DISK

# Bytes/s; the measured disk is added at run time under MEASURED_DISK.
LINKS: dict[str, float] = {"PCIe 4 x16": 25e9, "NVMe": 3e9}
__all__ = ["LINKS", "MEASURED_DISK", "measure_disk_bandwidth"]


def measure_disk_bandwidth(checkpoint: Checkpoint, *, max_reads: int = 256, max_s: float = 2.0) -> float:
    """Bytes/s of the engine's own expert reads (`DiskStore`, O_DIRECT where allowed), one expert at a time.

    The median over up to `max_reads` reads: on a shared machine a few reads wait behind other
    processes' I/O, and the median is the steady rate a miss sees (on this project's 2-core machine,
    0.42 MiB experts: median 1.0-1.3 GB/s in three runs, while the mean ranged 0.02-0.4 GB/s).
    """
    from moeflow.offload.store import DiskStore

    store = DiskStore(checkpoint, direct_io=True)
    try:
        keys = sorted(checkpoint.experts)
        loc = checkpoint.experts[keys[0]]
        inter, hidden = loc.inter, loc.hidden
        gate_up = torch.empty(2 * inter, hidden, dtype=loc.dtype)
        down = torch.empty(hidden, inter, dtype=loc.dtype)
        rates = []
        t_end = time.perf_counter() + max_s
        while len(rates) < max_reads and time.perf_counter() < t_end:
            key = keys[len(rates) % len(keys)]
            t0 = time.perf_counter()
            nbytes = store.read_into(key, gate_up, down)
            rates.append(nbytes / max(time.perf_counter() - t0, 1e-9))
        return float(np.median(rates))
    finally:
        store.close()
