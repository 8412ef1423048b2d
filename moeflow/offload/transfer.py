"""The transfer engine: reads experts ahead of need, several at once, on the cache's reader pool.

`prefetch(PrefetchPlan)` reserves slots and queues their reads as background work of the reader
pool (`moeflow.offload.readers`), so I/O overlaps compute and prefetches overlap each other. Demand
misses go through the same pool ahead of every prefetch (`ExpertCache.acquire`), and a prefetch
still queued when its layer needs it is taken over by the compute thread. On CUDA each read fills
through a dedicated copy stream and the slot carries an event that the compute stream waits on (no
host sync; `ExpertCache.read_slot`). With the reader process (`moeflow.offload.mover`) a prefetch is a
`MoveTask`: started and settled by the compute thread, its bytes moved by that process.
"""

from __future__ import annotations

import logging
import threading

from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.cache import ExpertCache
from moeflow.offload.mover import Reply, Run
from moeflow.offload.plans import PrefetchPlan

log = logging.getLogger(__name__)


class TransferEngine:
    """`background=False` fills in the caller's thread right after reserving (profiling replay): the same
    reserve -> start -> read -> complete protocol, with no thread and so no timing in the counts."""

    def __init__(self, cache: ExpertCache, *, background: bool = True) -> None:
        self.cache = cache
        self.background = background
        self._pending = 0  # prefetch reads queued or in progress
        self._idle = threading.Condition()

    def prefetch(self, plan: PrefetchPlan) -> int:
        """Reserve slots for the plan's experts that are not resident and queue their reads (or, without
        `background`, read them now); returns how many were issued. Every key is reserved before any is
        filled, so a slot still loading is never an eviction candidate of the same plan."""
        reserved = [(key, slot) for key in plan.keys if (slot := self.cache.reserve_for_prefetch(key)) is not None]
        if not self.background:
            for key, slot in reserved:
                self._fill(key, slot)
            return len(reserved)
        with self._idle:
            self._pending += len(reserved)
        tasks = [_Prefetch(self, key, slot) for key, slot in reserved]
        self.cache.readers.submit_all(tasks if self.cache.in_process else [task.run for task in tasks])
        return len(reserved)

    def drain(self) -> None:
        """Block until every queued prefetch has landed."""
        self.cache.readers.drain()
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        """Let the prefetches already queued land (the reader threads are the cache's; it stops them)."""
        self.drain()

    def _run(self, key: ExpertKey, slot: int) -> None:
        try:
            self._fill(key, slot)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _fill(self, key: ExpertKey, slot: int) -> None:
        if not self.cache.start_prefetch(key, slot):  # cancelled, or taken over by the compute thread
            return
        self._read(key, slot)

    def _read(self, key: ExpertKey, slot: int) -> None:
        """Read a started prefetch here."""
        try:
            nbytes, event = self.cache.read_slot(key, slot)
        except Exception:
            log.exception("prefetch of expert %s failed; it will be read on demand", key)
            self.cache.cancel_prefetch(key, slot)
            return
        self.cache.complete_prefetch(key, slot, nbytes, event)


class _Prefetch:
    """One prefetch as a `MoveTask` of the reader process; `run`: the whole prefetch, on a reader thread."""

    __slots__ = ("transfer", "key", "slot")

    def __init__(self, transfer: TransferEngine, key: ExpertKey, slot: int) -> None:
        self.transfer, self.key, self.slot = transfer, key, slot

    def run(self) -> None:
        self.transfer._run(self.key, self.slot)

    def begin(self) -> tuple[list[Run], bool, int] | None:
        cache = self.transfer.cache
        moves = None
        if cache.start_prefetch(self.key, self.slot):  # else cancelled, or taken over by the compute thread
            moves = cache.moves(self.key, self.slot)
            if moves is None:  # not plain bytes after all: read here
                self.transfer._read(self.key, self.slot)
        if moves is None:
            self.transfer._finished()
        return moves

    def early(self) -> None:
        self.transfer.cache._gate_up_landed(self.slot)

    def end(self, reply: Reply) -> None:
        cache = self.transfer.cache
        try:
            error = cache.moved(self.key, self.slot, reply)
            if error is not None:
                log.error("prefetch of expert %s failed (%s); it will be read on demand", self.key, error)
                cache.cancel_prefetch(self.key, self.slot)
            else:
                cache.complete_prefetch(self.key, self.slot, reply.nbytes)
        finally:
            self.transfer._finished()
