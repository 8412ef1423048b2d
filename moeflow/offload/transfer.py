"""The transfer engine: reads experts ahead of need on a background thread.

Misses are read synchronously by the cache in the compute thread. `prefetch(PrefetchPlan)` reserves
slots and queues reads here so I/O overlaps compute. On CUDA the fill runs on a dedicated copy
stream and the slot carries an event that the compute stream waits on (no host sync).
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.cache import ExpertCache
from moeflow.offload.plans import PrefetchPlan

log = logging.getLogger(__name__)


class TransferEngine:
    """`background=False` fills in the caller's thread right after reserving (profiling replay): the same
    reserve -> start -> read -> complete protocol, with no thread and so no timing in the counts."""

    def __init__(self, cache: ExpertCache, *, background: bool = True) -> None:
        self.cache = cache
        self._queue: queue.Queue[tuple[ExpertKey, int] | None] = queue.Queue()
        device = cache.pool.gate_up_S2ID.device
        self._copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="moeflow-transfer", daemon=True)
            self._thread.start()

    def prefetch(self, plan: PrefetchPlan) -> int:
        """Reserve slots for the plan's experts that are not resident and queue their reads (or, without a
        background thread, read them now); returns how many were issued. Every key is reserved before
        any is filled, so a slot still loading is never an eviction candidate of the same plan."""
        reserved = [(key, slot) for key in plan.keys if (slot := self.cache.reserve_for_prefetch(key)) is not None]
        for item in reserved:
            if self._thread is not None:
                self._queue.put(item)
            elif self.cache.start_prefetch(*item):
                self._fill(*item)
        return len(reserved)

    def drain(self) -> None:
        """Block until every queued prefetch has landed."""
        self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.cache.start_prefetch(*item):  # else cancelled, or read on demand meanwhile
                    self._fill(*item)
            finally:
                self._queue.task_done()

    def _fill(self, key: ExpertKey, slot: int) -> None:
        pool = self.cache.pool
        try:
            if self._copy_stream is None:
                nbytes = self.cache.store.read_into(key, pool.gate_up_S2ID[slot], pool.down_SDI[slot])
                event = None
            else:
                # The slot's previous expert may still be read by queued kernels: order after them.
                self._copy_stream.wait_stream(torch.cuda.default_stream(self._copy_stream.device))
                with torch.cuda.stream(self._copy_stream):
                    nbytes = self.cache.store.read_into(key, pool.gate_up_S2ID[slot], pool.down_SDI[slot])
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
        except Exception:
            log.exception("prefetch of expert %s failed; it will be read on demand", key)
            self.cache.cancel_prefetch(key, slot)
            return
        self.cache.complete_prefetch(key, slot, nbytes, event)
