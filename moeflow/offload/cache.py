"""The fast tier: a fixed pool of expert slots, and the cache that decides what occupies them.

Legend: S slots, I expert hidden size, H model hidden size.

The pool is allocated once, sized from the budget, and never grows: `capacity * slot_bytes <=
budget`. Every expert that is ever resident (or on its way) occupies one slot, so the budget is a
hard ceiling by construction; `resident_peak` records the most slots ever in use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeflow.offload.plans import ExpertKey
from moeflow.offload.policy import EvictionPolicy
from moeflow.offload.stats import CacheStats, LayerStats
from moeflow.offload.store import ExpertStore

# A slot is FREE, QUEUED (reserved by a prefetch whose read has not started: the compute thread may
# take the read over, and a correction may cancel it), LOADING (a read in progress) or READY.
_FREE, _QUEUED, _LOADING, _READY = 0, 1, 2, 3


class SlotPool:
    """`capacity` expert slots on one device, in transformers' fused layout."""

    def __init__(self, *, capacity: int, inter: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity = capacity
        self.gate_up_S2ID = torch.empty(capacity, 2 * inter, hidden, dtype=dtype, device=device)
        self.down_SDI = torch.empty(capacity, hidden, inter, dtype=dtype, device=device)
        self.slot_bytes = (self.gate_up_S2ID[0].nbytes + self.down_SDI[0].nbytes) if capacity else 0

    @property
    def nbytes(self) -> int:
        return self.gate_up_S2ID.nbytes + self.down_SDI.nbytes


@dataclass
class _LayerCounters:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0


class ExpertCache:
    """Maps experts to slots. Thread-safe: the compute thread acquires, the transfer thread fills."""

    def __init__(
        self,
        *,
        pool: SlotPool,
        store: ExpertStore,
        policy: EvictionPolicy,
        layers: Sequence[int],
        budget_bytes: int,
    ) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.budget_bytes = budget_bytes
        n = pool.capacity
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * n
        self._state = [_FREE] * n
        self._pins = [0] * n
        self._unused_prefetch = [False] * n  # loaded by a prefetch and not yet used
        self._ready_event: list[object | None] = [None] * n  # CUDA event of an async fill, else None
        self._free = list(range(n - 1, -1, -1))
        self._cv = threading.Condition()
        self._counters = {layer: _LayerCounters() for layer in layers}
        self._resident_peak = 0

    # ---- compute thread -------------------------------------------------------------------------

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[dict[int, int]]:
        """Pin `experts` of `layer` in slots for the duration of the block; returns expert -> slot.

        Resident experts are hits; the rest are read synchronously (demand misses). An expert whose
        prefetch is still queued is a miss too: this thread reads it now instead of waiting for the
        transfer thread to reach it. At most `capacity` experts may be acquired at once.
        """
        assert len(experts) <= self.pool.capacity, "caller must split a layer into waves of <= capacity"
        t0 = time.perf_counter()
        counters = self._counters[layer]
        slot_of: dict[int, int] = {}
        to_read: list[tuple[ExpertKey, int]] = []
        with self._cv:
            for e in experts:
                key = (layer, e)
                s = self._slot_of.get(key)
                if s is None:
                    continue
                self._pins[s] += 1
                self.policy.on_access(key)
                slot_of[e] = s
                if self._state[s] == _QUEUED:  # take the queued read over: a demand miss
                    self._state[s] = _LOADING
                    self._unused_prefetch[s] = False
                    counters.misses += 1
                    to_read.append((key, s))
                    continue
                counters.hits += 1
                if self._unused_prefetch[s]:
                    counters.prefetch_hits += 1
                    self._unused_prefetch[s] = False
            for e in experts:
                if e in slot_of:
                    continue
                key = (layer, e)
                s = self._take_slot_locked(wait=True)
                self._assign_locked(key, s, pins=1)
                counters.misses += 1
                self.policy.on_access(key)
                slot_of[e] = s
                to_read.append((key, s))
        try:
            for key, s in to_read:
                nbytes = self.store.read_into(key, self.pool.gate_up_S2ID[s], self.pool.down_SDI[s])
                with self._cv:
                    counters.bytes_read += nbytes
                    self._state[s] = _READY
                    self._cv.notify_all()
            with self._cv:
                # Wait for experts a prefetch is still bringing in.
                self._cv.wait_for(lambda: all(self._state[s] == _READY for s in slot_of.values()))
                events = [self._ready_event[s] for s in slot_of.values() if self._ready_event[s] is not None]
            for event in events:
                torch.cuda.current_stream().wait_event(event)  # compute waits for the copy stream, no host sync
            counters.stall_s += time.perf_counter() - t0
            yield slot_of
        finally:
            with self._cv:
                for s in slot_of.values():
                    self._pins[s] -= 1
                for _, s in to_read:
                    if self._state[s] != _READY:  # the demand read failed: the slot holds garbage
                        self._evict_locked(s, count_waste=False)
                self._cv.notify_all()

    def is_resident(self, key: ExpertKey) -> bool:
        with self._cv:
            return key in self._slot_of

    # ---- transfer thread ------------------------------------------------------------------------

    def reserve_for_prefetch(self, key: ExpertKey) -> int | None:
        """Claim a slot for `key` without waiting; None if resident already or nothing is evictable."""
        with self._cv:
            if key in self._slot_of:
                return None
            s = self._take_slot_locked(wait=False)
            if s is None:
                return None
            self._assign_locked(key, s, pins=0)
            self._state[s] = _QUEUED
            self._unused_prefetch[s] = True
            return s

    def start_prefetch(self, key: ExpertKey, slot: int) -> bool:
        """The transfer thread is about to read `key` into `slot`; False if that read is no longer wanted
        (the prefetch was cancelled, or the compute thread took the read over)."""
        with self._cv:
            if self._key_of[slot] != key or self._state[slot] != _QUEUED:
                return False
            self._state[slot] = _LOADING
            return True

    def cancel_queued(self, keys: Iterable[ExpertKey]) -> int:
        """Drop the prefetches of `keys` whose reads have not started; returns how many were dropped."""
        dropped = 0
        with self._cv:
            for key in keys:
                s = self._slot_of.get(key)
                if s is not None and self._state[s] == _QUEUED and self._pins[s] == 0:
                    self._evict_locked(s, count_waste=False)
                    dropped += 1
            if dropped:
                self._cv.notify_all()
        return dropped

    def complete_prefetch(self, key: ExpertKey, slot: int, nbytes: int, event: object | None = None) -> None:
        with self._cv:
            self._counters[key[0]].bytes_read += nbytes
            self._ready_event[slot] = event
            self._state[slot] = _READY
            self._cv.notify_all()

    def cancel_prefetch(self, key: ExpertKey, slot: int) -> None:
        """A reserved prefetch failed: give the slot back."""
        with self._cv:
            self._evict_locked(slot, count_waste=False)
            self._cv.notify_all()

    # ---- slots ----------------------------------------------------------------------------------

    def _take_slot_locked(self, *, wait: bool) -> int | None:
        while True:
            if self._free:
                return self._free.pop()
            candidates = [
                k for k, s in self._slot_of.items() if self._pins[s] == 0 and self._state[s] == _READY
            ]
            if not candidates and wait:
                # A demand read is certain, a queued prefetch is a guess: drop one rather than wait for it.
                candidates = [k for k, s in self._slot_of.items() if self._pins[s] == 0 and self._state[s] == _QUEUED]
            if candidates:
                s = self._slot_of[self.policy.victim(candidates)]
                self._evict_locked(s, count_waste=self._state[s] == _READY)
                return self._free.pop()
            if not wait:
                return None
            # Every slot is pinned or being read; a read in flight will finish and free one up.
            self._cv.wait()

    def _assign_locked(self, key: ExpertKey, s: int, *, pins: int) -> None:
        self._slot_of[key] = s
        self._key_of[s] = key
        self._state[s] = _LOADING
        self._pins[s] = pins
        self._ready_event[s] = None
        self.policy.on_insert(key)
        self._resident_peak = max(self._resident_peak, len(self._slot_of))

    def _evict_locked(self, s: int, *, count_waste: bool) -> None:
        key = self._key_of[s]
        assert key is not None and self._pins[s] == 0
        if count_waste and self._unused_prefetch[s]:
            self._counters[key[0]].wasted_prefetches += 1
        del self._slot_of[key]
        self.policy.on_evict(key)
        self._key_of[s] = None
        self._state[s] = _FREE
        self._unused_prefetch[s] = False
        self._ready_event[s] = None
        self._free.append(s)

    # ---- observation ----------------------------------------------------------------------------

    def resident(self) -> set[ExpertKey]:
        with self._cv:
            return set(self._slot_of)

    def stats(self) -> CacheStats:
        with self._cv:
            per_layer = tuple(LayerStats(layer=layer, **vars(c)) for layer, c in sorted(self._counters.items()))
            peak = self._resident_peak
        return CacheStats(
            hits=sum(s.hits for s in per_layer),
            misses=sum(s.misses for s in per_layer),
            prefetch_hits=sum(s.prefetch_hits for s in per_layer),
            wasted_prefetches=sum(s.wasted_prefetches for s in per_layer),
            bytes_read=sum(s.bytes_read for s in per_layer),
            stall_s=sum(s.stall_s for s in per_layer),
            budget_bytes=self.budget_bytes,
            slot_bytes=self.pool.slot_bytes,
            capacity_slots=self.pool.capacity,
            resident_peak_bytes=peak * self.pool.slot_bytes,
            direct_io=self.store.direct_io,
            per_layer=per_layer,
        )

    def reset_stats(self) -> None:
        with self._cv:
            self._counters = {layer: _LayerCounters() for layer in self._counters}
