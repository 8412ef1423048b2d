"""The fast tier: a fixed pool of expert slots, and the cache that decides what occupies them.

Legend: S slots, I expert hidden size, H model hidden size.

The pool is allocated once, sized from the budget, and never grows: `capacity * slot_bytes <=
budget`. Every expert that is ever resident (or on its way) occupies one slot, so the budget is a
hard ceiling by construction; `resident_peak` records the most slots ever in use.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from moeflow.kernels.quant import ExpertFormat, QuantizedPool, fill_int4pack_scales, int4pack_scales_shapes
from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.mover import ReaderProcess, Reply, Run, SharedRegion
from moeflow.offload.policy import EvictionPolicy, PredictivePolicy
from moeflow.offload.readers import MoveJob, ProcessReaderPool, ReaderPool, ReadJob
from moeflow.offload.stats import CacheStats, LayerStats
from moeflow.offload.store import ExpertStore, aligned_empty

T = TypeVar("T")

class SlotState(enum.Enum):
    FREE = "free"  # holds nothing; its index is on the free list
    QUEUED = "queued"  # reserved by a prefetch whose read has not started (the compute thread may take the
    #                    read over; a correction may cancel it)
    LOADING = "loading"  # a read is writing the slot now
    READY = "ready"  # holds its expert


_SETTLED = (SlotState.READY, SlotState.QUEUED)  # what a layer waiting on a prefetch read wakes up to
# Experts from this size on are read with an early reply (`ExpertCache.early_gate_up`): it costs the reader process a
# pipe write and the compute thread its collection (tens of us). The shipped model widened with zero rows (aligned
# layout, LRU at 25% from disk, held-out prompts x 64 tokens, 3 rounds, 2-core AMD EPYC VM, ad hoc, 2026-12-05), tok/s
# with early replies against without: 1.1 MiB experts (24 prompts) 125 / 164 / 166 against 140 / 149 / 142; 2.25 MiB
# (12 prompts) 100 / 101 / 104 against 99 / 80 / 91; 4.5 MiB (12) 58 / 60 / 61 against 46 / 52 / 48. Smaller ones
# were not measured.
EARLY_GATE_UP_BYTES = 1 << 20


@dataclass(slots=True)
class _Slot:
    """One slot's bookkeeping. Invariants (held under the cache's lock):

    - `key is None` exactly when `state is FREE`, and then `pins == 0`, `unused_prefetch` is False,
      `ready_event is None`, and the slot's index is on the free list;
    - a key maps to at most one slot (`ExpertCache._slot_of[key]` is this slot's index);
    - only a READY or QUEUED slot with `pins == 0` may be evicted;
    - `unused_prefetch` is True from a prefetch's reservation until the expert's first use;
    - `gate_up_in` only while LOADING: the read has filled the gate/up matrices, the down matrix is still being read
      (`ExpertCache.early_gate_up`).
    """

    key: ExpertKey | None = None
    state: SlotState = SlotState.FREE
    pins: int = 0  # layers running on this expert now
    unused_prefetch: bool = False
    ready_event: object | None = None  # CUDA event of an asynchronous fill, else None
    gate_up_in: bool = False

    def assign(self, key: ExpertKey, pins: int) -> None:
        self.key, self.state, self.pins, self.ready_event, self.gate_up_in = key, SlotState.LOADING, pins, None, False

    def clear(self) -> None:
        self.key, self.state, self.pins, self.unused_prefetch, self.ready_event = None, SlotState.FREE, 0, False, None
        self.gate_up_in = False


class SlotPool:
    """`capacity` expert slots on one device, in transformers' fused layout.

    With `fmt` (a quantized or cast expert format, `moeflow.kernels.quant`), a slot holds the expert as
    stored in that format: `gate_up_S2ID` / `down_SDI` are then the quantized weights (int8, packed int4
    or bf16/fp16; their last dimension is the packed one) and `gate_up_scale` / `down_scale` their scales,
    and `slot_bytes` counts all of them: the budget is a ceiling on the quantized bytes.
    """

    def __init__(
        self,
        *,
        capacity: int,
        inter: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        fmt: ExpertFormat | None = None,
        packed_scales: bool = False,
    ) -> None:
        self.capacity = capacity
        self.inter, self.hidden, self.fmt = inter, hidden, fmt
        self.gate_up_scale: torch.Tensor | None = None
        self.down_scale: torch.Tensor | None = None
        # int4 on the CPU (`packed_scales`): the scales also in torch's matmul layout, written once per read
        self.gate_up_scale_zeros: torch.Tensor | None = None
        self.down_scale_zeros: torch.Tensor | None = None
        # The CPU pool's memory as the reader process maps it (`moeflow.offload.mover`); their descriptors close
        # with the pool.
        self.regions: list[SharedRegion] = []
        weakref.finalize(self, _close_all, self.regions)

        def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            if device.type == "cpu":  # on whole pages, faulted now: a disk read can land in a slot (`DiskStore`)
                tensor, region = aligned_empty(shape, dtype)
                if region is not None:
                    self.regions.append(region)
                return tensor
            return torch.empty(shape, dtype=dtype, device=device)

        if fmt is None:
            self.gate_up_S2ID = empty(capacity, 2 * inter, hidden, dtype=dtype)
            self.down_SDI = empty(capacity, hidden, inter, dtype=dtype)
        else:
            wdt = fmt.weight_dtype
            self.gate_up_S2ID = empty(capacity, *fmt.weight_shape(2 * inter, hidden), dtype=wdt)
            self.down_SDI = empty(capacity, *fmt.weight_shape(hidden, inter), dtype=wdt)
            gu_shape, d_shape = fmt.scale_shape(2 * inter, hidden), fmt.scale_shape(hidden, inter)
            if gu_shape is not None and d_shape is not None:
                self.gate_up_scale = empty(capacity, *gu_shape, dtype=fmt.scale_dtype)
                self.down_scale = empty(capacity, *d_shape, dtype=fmt.scale_dtype)
            if packed_scales and device.type == "cpu":
                gu_sz, d_sz = (None if shape is None else torch.zeros(capacity, *shape, 2, dtype=torch.bfloat16)
                               for shape in int4pack_scales_shapes(fmt, inter, hidden))  # fmt: skip
                self.gate_up_scale_zeros, self.down_scale_zeros = gu_sz, d_sz
        self.slot_bytes = sum(t[0].nbytes for t in self._tensors()) if capacity else 0

    def _tensors(self) -> list[torch.Tensor]:
        every = (self.gate_up_S2ID, self.down_SDI, self.gate_up_scale, self.down_scale, self.gate_up_scale_zeros,
                 self.down_scale_zeros)  # fmt: skip
        return [t for t in every if t is not None]

    def prepare_slot(self, s: int) -> None:
        """After slot `s` was read: its int4 scales into torch's matmul layout, where the pool keeps them."""
        self.prepare_gate_up(s)
        if self.down_scale_zeros is not None:
            fill_int4pack_scales(self.down_scale[s], self.fmt, self.inter, self.down_scale_zeros[s])

    def prepare_gate_up(self, s: int) -> None:
        """`prepare_slot` for the gate/up projection alone: once its bytes are in, before the down matrix's
        (`ExpertCache.early_gate_up`)."""
        assert self.fmt is not None or self.gate_up_scale_zeros is None
        if self.gate_up_scale_zeros is not None:
            fill_int4pack_scales(self.gate_up_scale[s], self.fmt, self.hidden, self.gate_up_scale_zeros[s])

    def gate_up_ranges(self, s: int) -> list[tuple[int, int]]:
        """The address ranges [start, end) of slot `s`'s gate/up weights and, in a scaled pool, their scales."""
        views = [self.gate_up_S2ID[s], *([self.gate_up_scale[s]] if self.gate_up_scale is not None else [])]
        return [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in views]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    def scale_views(self, s: int) -> dict[str, torch.Tensor]:
        """Slot `s`'s scales as the store fills them, by parameter ("gate_up", "down"); {} when unscaled."""
        if self.gate_up_scale is None or self.down_scale is None:
            return {}
        return {"gate_up": self.gate_up_scale[s], "down": self.down_scale[s]}

    def quantized(self) -> QuantizedPool:
        """The pool as `moeflow.kernels.quant.quantized_experts_forward` reads it (formatted pools only)."""
        assert self.fmt is not None
        return QuantizedPool(
            fmt=self.fmt,
            gate_up_q=self.gate_up_S2ID,
            down_q=self.down_SDI,
            gate_up_scale=self.gate_up_scale,
            down_scale=self.down_scale,
            inter=self.inter,
            hidden=self.hidden,
            gate_up_scale_zeros=self.gate_up_scale_zeros,
            down_scale_zeros=self.down_scale_zeros,
        )


def _close_all(regions: list[SharedRegion]) -> None:
    for r in regions:
        os.close(r.fd)


@dataclass
class _LayerCounters:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0


class ExpertCache:
    """Maps experts to slots. Thread-safe: the compute thread acquires, reader threads fill.

    Every change to slots or to the eviction policy happens under one lock (`_cv`), including the
    prefetcher's protect/release/demote, so a policy is only ever called by one thread at a time.
    Reads happen outside the lock, into slots in state LOADING that nobody else may touch.

    `readers`: reader threads (`ReaderPool`) shared by demand misses and prefetches; 0 reads every
    miss in the compute thread, one after another (profiling replay, where nothing is timed). With
    `read_process` they run in a process of their own where they can (`in_process`), on `reader_cpus`.
    """

    def __init__(
        self,
        *,
        pool: SlotPool,
        store: ExpertStore,
        policy: EvictionPolicy,
        layers: Sequence[int],
        budget_bytes: int,
        readers: int = 0,
        read_process: bool = False,
        reader_cpus: Sequence[int] | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        # With `read_process`, reads go to a process of their own where they can (`moeflow.offload.mover`: a CPU pool
        # in shared memory, a store that reads plain bytes), driven by the compute thread (`ProcessReaderPool`).
        self.in_process = read_process and self._movable()
        # ...and a large expert's read replies early too, once its gate/up matrices are in, so that the layer waiting
        # for it computes their product while the down matrix is read (`arrivals`' `on_gate_up`).
        self.early_gate_up = self.in_process and pool.slot_bytes >= EARLY_GATE_UP_BYTES
        self.readers: ReaderPool | ProcessReaderPool
        if self.in_process:
            process = ReaderProcess(store.files, pool.regions, threads=readers, direct_io=store.direct_io,
                                    buffer_bytes=store.read_buffer_bytes(), cpus=reader_cpus)  # fmt: skip
            self.readers = ProcessReaderPool(process, window=readers + 1)
        else:
            self.readers = ReaderPool(readers)
        self._reading_base = 0.0  # `readers.reading_s()` at the last `reset_stats`
        device = pool.gate_up_S2ID.device
        self._copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.policy = policy
        self.budget_bytes = budget_bytes
        n = pool.capacity
        self._slots = [_Slot() for _ in range(n)]
        self._slot_of: dict[ExpertKey, int] = {}
        self._free = list(range(n - 1, -1, -1))
        self._cv = threading.Condition()
        self._counters = {layer: _LayerCounters() for layer in layers}
        self._resident_peak = 0
        self._when_read: list[Callable[[], None]] = []  # `when_layer_read`: run by the compute thread

    # ---- compute thread -------------------------------------------------------------------------

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[dict[int, int]]:
        """Pin `experts` of `layer` in slots for the duration of the block; returns expert -> slot once every
        one of them is ready (`arrivals`, all gathered)."""
        with self.arrivals(layer, experts) as batches:
            slot_of: dict[int, int] = {}
            for ready in batches:
                slot_of.update(ready)
            yield slot_of

    def begin_layer(self, layer: int) -> None:
        """MoE layer `layer` runs now (once per forward, however many waves it takes): the policy's clock. The
        reader process's replies so far are taken in (`ProcessReaderPool.poll`)."""
        self.readers.poll()
        with self._cv:
            self.policy.on_layer(layer)

    def when_layer_read(self, fn: Callable[[], None]) -> None:
        """Run `fn()` once, in the compute thread, as soon as the experts of the next layer it acquires are all
        in their slots (before it computes the last of them): work for the link that must not delay that
        layer's demand reads, and that the layer's compute can hide."""
        self._when_read.append(fn)

    def _layer_read(self) -> None:
        callbacks, self._when_read = self._when_read, []
        for fn in callbacks:
            fn()

    @contextmanager
    def arrivals(
        self, layer: int, experts: Sequence[int], on_gate_up: Callable[[int, int], None] | None = None
    ) -> Iterator[Iterator[dict[int, int]]]:
        """Pin `experts` of `layer` in slots for the duration of the block; yields an iterator of
        expert -> slot batches, each handed out as soon as its experts are ready: first the resident ones,
        then each read as it lands, so the caller computes with those while the readers read the rest.

        Resident experts are hits; the rest are demand misses, all queued at once to the reader pool ahead
        of every prefetch; whenever the caller asks for the next batch and none is ready, this thread reads
        one that no reader has started. An expert whose prefetch is still queued is a miss too: its read
        joins the demand reads instead of waiting for a reader to reach it; one whose prefetch read fails
        while this thread waits for it is read here. If a demand read fails, the iterator raises its error;
        its slot is freed (never READY with garbage) once every read of the layer has finished, which the
        block's exit waits for. At most `capacity` experts may be acquired at once. Stall: the time spent
        in here and in the iterator, not in the block's own work.

        `on_gate_up(expert, slot)`: called from the iterator, while it waits, for each expert whose read has filled
        its gate/up matrices and not yet its down matrix (`early_gate_up` reads), before its batch comes; not called
        for an expert that lands whole at once. Its time is not stall.
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
                slot = self._slots[s]
                slot.pins += 1
                self.policy.on_access(key)
                slot_of[e] = s
                if slot.state is SlotState.QUEUED:  # take the queued read over: a demand miss
                    slot.state = SlotState.LOADING
                    slot.unused_prefetch = False
                    counters.misses += 1
                    to_read.append((key, s))
                    continue
                counters.hits += 1
                if slot.unused_prefetch:
                    counters.prefetch_hits += 1
                    slot.unused_prefetch = False
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
        failed: dict[int, BaseException] = {}  # slot -> its demand read's error
        jobs: list[ReadJob] | list[MoveJob] = []

        def read(pending: list[tuple[ExpertKey, int]]) -> None:
            if self.in_process:
                jobs.extend(self.readers.start([_DemandRead(self, key, s, counters, failed) for key, s in pending]))
                return
            fns: list[Callable[[], None]] = []
            for key, s in pending:
                parts = self._read_parts(key, s)
                if parts is None:
                    fns.append(lambda key=key, s=s: self._demand_read(key, s, counters, failed))
                else:
                    fns.extend(_PartedRead(self, s, parts, counters, failed).jobs())
            jobs.extend(self.readers.start(fns))

        def batches() -> Iterator[dict[int, int]]:
            waiting = dict(slot_of)
            early: set[int] = set()  # experts handed to `on_gate_up`
            while waiting:
                t = time.perf_counter()
                with self._cv:
                    error = next((failed[s] for s in waiting.values() if s in failed), None)
                if error is not None:  # the layer's other reads land first (and stay), then the error is raised
                    while self.readers.help(jobs):
                        pass
                    self.readers.finish(jobs)
                    raise error
                with self._cv:
                    ready = {e: s for e, s in waiting.items() if self._slots[s].state is SlotState.READY}
                    halves = [] if on_gate_up is None else [
                        (e, s) for e, s in waiting.items() if self._slots[s].gate_up_in and e not in early]
                    # A prefetch read that failed while this thread waited came back QUEUED: read it here.
                    requeued = [(self._slots[s].key, s) for s in waiting.values()
                                if self._slots[s].state is SlotState.QUEUED]  # fmt: skip
                    for _, s in requeued:
                        self._slots[s].state = SlotState.LOADING
                    to_read.extend(requeued)
                if requeued:
                    read(requeued)
                if halves:
                    counters.stall_s += time.perf_counter() - t
                    for e, s in halves:
                        early.add(e)
                        on_gate_up(e, s)
                    t = time.perf_counter()
                if not ready and halves:
                    continue
                if not ready:
                    if not self.readers.help(jobs):
                        with self._cv:
                            self._cv.wait_for(lambda: any(
                                self._slots[s].state in _SETTLED or s in failed
                                or (on_gate_up is not None and self._slots[s].gate_up_in and e not in early)
                                for e, s in waiting.items()))  # fmt: skip
                    counters.stall_s += time.perf_counter() - t
                    continue
                for e, s in ready.items():
                    del waiting[e]
                    if self._slots[s].ready_event is not None:
                        torch.cuda.current_stream().wait_event(self._slots[s].ready_event)  # no host sync
                counters.stall_s += time.perf_counter() - t
                if not waiting and self._when_read:
                    self._layer_read()
                yield ready

        try:
            read(to_read)
            counters.stall_s += time.perf_counter() - t0
            yield batches()
        finally:
            self.readers.finish(jobs)  # no read may still be writing into a slot given back below
            with self._cv:
                for s in slot_of.values():
                    self._slots[s].pins -= 1
                for _, s in to_read:
                    if self._slots[s].state is not SlotState.READY:  # the demand read failed: the slot holds garbage
                        self._evict_locked(s, count_waste=False)
                self._cv.notify_all()

    def _demand_read(
        self, key: ExpertKey, s: int, counters: _LayerCounters, failed: dict[int, BaseException]
    ) -> None:  # fmt: skip
        """Read slot `s`, which the acquiring thread holds in LOADING (any thread runs this); it becomes READY,
        or its error is recorded in `failed`."""
        try:
            nbytes, event = self.read_slot(key, s)
        except Exception as e:
            self._landed(s, counters, failed, error=e)
            raise
        self._landed(s, counters, failed, nbytes=nbytes, event=event)

    def _landed(
        self,
        s: int,
        counters: _LayerCounters,
        failed: dict[int, BaseException],
        *,
        nbytes: int = 0,
        event: object | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A demand read of slot `s` ended: READY with its bytes counted, or its error recorded in `failed`."""
        with self._cv:
            if error is not None:
                failed[s] = error
            else:
                counters.bytes_read += nbytes
                self._slots[s].ready_event = event
                self._slots[s].state = SlotState.READY
                self._slots[s].gate_up_in = False
            self._cv.notify_all()

    # ---- prefetcher: eviction preferences of a predictive policy ---------------------------------

    def protect(self, keys: Iterable[ExpertKey]) -> None:
        """Predicted experts: evict them only when nothing else can go (`PredictivePolicy`)."""
        with self._cv:
            self._predictive().protect(keys)

    def release(self, keys: Iterable[ExpertKey]) -> None:
        with self._cv:
            self._predictive().release(keys)

    def demote(self, keys: Iterable[ExpertKey]) -> None:
        """Wrong predictions that are resident: make them the next victims."""
        with self._cv:
            self._predictive().demote(keys)

    def advise(self, advice: Callable[[PredictivePolicy, int], T]) -> T:
        """`advice(policy, free slots)` under the lock: the prefetcher reads and updates the predictive
        policy (what it expects of the step, what it would evict) consistently with the slots."""
        with self._cv:
            return advice(self._predictive(), len(self._free))

    def _predictive(self) -> PredictivePolicy:
        assert isinstance(self.policy, PredictivePolicy), "predictive prefetch needs the predictive policy"
        return self.policy

    # ---- reads (any thread) ---------------------------------------------------------------------

    def _read_parts(self, key: ExpertKey, s: int) -> list[Callable[[], int]] | None:
        """A demand read of `key` into slot `s` as parts for several threads (`DiskStore.read_parts`), or None:
        one job (a store that reads whole experts, a GPU slot, a small expert)."""
        read_parts = getattr(self.store, "read_parts", None)
        if read_parts is None or self._copy_stream is not None:
            return None
        pool = self.pool
        return read_parts(key, pool.gate_up_S2ID[s], pool.down_SDI[s], pool.scale_views(s) or None)

    def _movable(self) -> bool:
        """Whether this cache's reads can go to the reader process: CPU slots in shared memory, and a store that
        reads them as plain byte copies (every slot of a pool has the layout of the first)."""
        moves = getattr(self.store, "movable", None)  # `DiskStore.movable`
        pool = self.pool
        shared = {r.address for r in pool.regions}
        read = [t for t in (pool.gate_up_S2ID, pool.down_SDI, pool.gate_up_scale, pool.down_scale) if t is not None]
        return (moves is not None and pool.capacity > 0 and all(t.data_ptr() in shared for t in read)
                and moves(pool.gate_up_S2ID[0], pool.down_SDI[0], pool.scale_views(0) or None))  # fmt: skip

    def moves(self, key: ExpertKey, s: int) -> tuple[list[Run], bool, int] | None:
        """`read_slot` as byte moves for the reader process (`DiskStore.moves`), or None: not plain bytes; with the
        number of leading runs after which the process replies early (`early_gate_up`: those that fill the gate/up
        matrices, which the store puts first and alone, whatever the checkpoint's order; else 0)."""
        pool = self.pool
        moves = self.store.moves(key, pool.gate_up_S2ID[s], pool.down_SDI[s], pool.scale_views(s) or None,
                                 gate_up_first=self.early_gate_up)
        if moves is None:
            return None
        runs, check = moves
        early = 0
        if self.early_gate_up:
            ranges = pool.gate_up_ranges(s)
            inside = [all(any(lo <= p.address and p.address + p.nbytes <= hi for lo, hi in ranges) for p in run.pieces)
                      for run in runs]  # fmt: skip
            early = inside.index(False) if False in inside else 0
            if any(inside[early:]):  # gate/up bytes after the first run that is not theirs: one reply
                early = 0
        return runs, check, early

    def _gate_up_landed(self, s: int) -> None:
        """The read in progress into slot `s` has filled its gate/up matrices (`early_gate_up`)."""
        try:
            self.pool.prepare_gate_up(s)
        except Exception:  # the end of the read prepares the whole slot again and reports what fails
            return
        with self._cv:
            slot = self._slots[s]
            if slot.state is SlotState.LOADING:
                slot.gate_up_in = True
                self._cv.notify_all()

    def moved(self, key: ExpertKey, s: int, reply: Reply) -> BaseException | None:
        """The reader process has answered `moves(key, s)`: the slot prepared (`read_slot`'s ending), or the error."""
        self.store.moved(key, reply)
        error = reply.error()
        if error is None:
            try:
                self.pool.prepare_slot(s)
            except Exception as e:
                error = e
        return error

    def read_slot(self, key: ExpertKey, s: int) -> tuple[int, object | None]:
        """Read `key` into slot `s`, which the caller holds in state LOADING; no lock is held. Returns the
        bytes read and, on CUDA, the event of the copy stream that the compute stream must wait on."""
        pool = self.pool
        scales = pool.scale_views(s)
        extra = {"scales": scales} if scales else {}
        if self._copy_stream is None:
            nbytes = self.store.read_into(key, pool.gate_up_S2ID[s], pool.down_SDI[s], **extra)
            pool.prepare_slot(s)
            return nbytes, None
        # The slot's previous expert may still be read by queued kernels: order after them.
        self._copy_stream.wait_stream(torch.cuda.default_stream(self._copy_stream.device))
        with torch.cuda.stream(self._copy_stream):
            nbytes = self.store.read_into(key, pool.gate_up_S2ID[s], pool.down_SDI[s], **extra)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return nbytes, event

    def close(self) -> None:
        """Stop the reader threads (queued prefetches are dropped, reads in progress finish)."""
        self.readers.close()

    # ---- prefetches (reader threads) ------------------------------------------------------------

    def reserve_for_prefetch(self, key: ExpertKey) -> int | None:
        """Claim a slot for `key` without waiting; None if resident already or nothing is evictable."""
        with self._cv:
            if key in self._slot_of:
                return None
            s = self._take_slot_locked(wait=False)
            if s is None:
                return None
            self._assign_locked(key, s, pins=0)
            self._slots[s].state = SlotState.QUEUED
            self._slots[s].unused_prefetch = True
            return s

    def start_prefetch(self, key: ExpertKey, s: int) -> bool:
        """The transfer thread is about to read `key` into slot `s`; False if that read is no longer wanted
        (the prefetch was cancelled, or the compute thread took the read over)."""
        with self._cv:
            slot = self._slots[s]
            if slot.key != key or slot.state is not SlotState.QUEUED:
                return False
            slot.state = SlotState.LOADING
            return True

    def cancel_queued(self, keys: Iterable[ExpertKey]) -> int:
        """Drop the prefetches of `keys` whose reads have not started; returns how many were dropped."""
        dropped = 0
        with self._cv:
            for key in keys:
                s = self._slot_of.get(key)
                if s is not None and self._slots[s].state is SlotState.QUEUED and self._slots[s].pins == 0:
                    self._evict_locked(s, count_waste=False)
                    dropped += 1
            if dropped:
                self._cv.notify_all()
        return dropped

    def complete_prefetch(self, key: ExpertKey, s: int, nbytes: int, event: object | None = None) -> None:
        with self._cv:
            self._counters[key[0]].bytes_read += nbytes
            self._slots[s].ready_event = event
            self._slots[s].state = SlotState.READY
            self._slots[s].gate_up_in = False
            self._cv.notify_all()

    def cancel_prefetch(self, key: ExpertKey, s: int) -> None:
        """A prefetch read failed: give the slot back, or, if a layer is waiting for it, hand the read to
        that layer (back to QUEUED, which `acquire` takes over)."""
        with self._cv:
            if self._slots[s].pins:
                self._slots[s].state = SlotState.QUEUED
                self._slots[s].gate_up_in = False
            else:
                self._evict_locked(s, count_waste=False)
            self._cv.notify_all()

    # ---- slots ----------------------------------------------------------------------------------

    def _evictable_locked(self, state: SlotState) -> list[ExpertKey]:
        return [k for k, s in self._slot_of.items() if self._slots[s].pins == 0 and self._slots[s].state is state]

    def _take_slot_locked(self, *, wait: bool) -> int | None:
        while True:
            if self._free:
                return self._free.pop()
            candidates = self._evictable_locked(SlotState.READY)
            if not candidates and wait:
                # A demand read is certain, a queued prefetch is a guess: drop one rather than wait for it.
                candidates = self._evictable_locked(SlotState.QUEUED)
            if candidates:
                s = self._slot_of[self.policy.victim(candidates)]
                self._evict_locked(s, count_waste=self._slots[s].state is SlotState.READY)
                return self._free.pop()
            if not wait:
                return None
            # Every slot is pinned or being read; a read in flight will finish and free one up. The reader process's
            # replies are this thread's to take in (the lock is re-entrant: taking one in settles its slot).
            if not self.readers.help(()):
                self._cv.wait()

    def _assign_locked(self, key: ExpertKey, s: int, *, pins: int) -> None:
        self._slot_of[key] = s
        self._slots[s].assign(key, pins)
        self.policy.on_insert(key)
        self._resident_peak = max(self._resident_peak, len(self._slot_of))

    def _evict_locked(self, s: int, *, count_waste: bool) -> None:
        slot = self._slots[s]
        key = slot.key
        assert key is not None and slot.pins == 0
        if count_waste and slot.unused_prefetch:
            self._counters[key[0]].wasted_prefetches += 1
        del self._slot_of[key]
        self.policy.on_evict(key)
        slot.clear()
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
            reading_s=self.readers.reading_s() - self._reading_base,
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
            self._reading_base = self.readers.reading_s()


class _DemandRead:
    """A demand read of slot `s` as a `MoveTask` of the reader process (`ExpertCache.arrivals`); `run`: read here,
    as a reader thread would."""

    __slots__ = ("cache", "key", "s", "counters", "failed")

    def __init__(
        self, cache: ExpertCache, key: ExpertKey, s: int, counters: _LayerCounters, failed: dict[int, BaseException]
    ) -> None:  # fmt: skip
        self.cache, self.key, self.s, self.counters, self.failed = cache, key, s, counters, failed

    def run(self) -> None:
        self.cache._demand_read(self.key, self.s, self.counters, self.failed)

    def begin(self) -> tuple[list[Run], bool, int] | None:
        moves = self.cache.moves(self.key, self.s)
        if moves is None:  # not plain bytes after all: read here (a failure is recorded in `failed`)
            with contextlib.suppress(Exception):
                self.run()
        return moves

    def early(self) -> None:
        self.cache._gate_up_landed(self.s)

    def end(self, reply: Reply) -> None:
        error = self.cache.moved(self.key, self.s, reply)
        self.cache._landed(self.s, self.counters, self.failed, nbytes=reply.nbytes, error=error)


class _PartedRead:
    """One demand read of slot `s` run as independent parts by any threads (`ExpertCache._read_parts`): the part
    that finishes last prepares the slot and makes it READY, or records the first part's error in `failed`, as
    `ExpertCache._demand_read` does for a whole read. A part abandoned unstarted (`ReaderPool.finish`) leaves the
    slot LOADING, which the acquiring block's exit evicts."""

    def __init__(
        self,
        cache: ExpertCache,
        s: int,
        parts: list[Callable[[], int]],
        counters: _LayerCounters,
        failed: dict[int, BaseException],
    ) -> None:
        self.cache, self.s, self.parts, self.counters, self.failed = cache, s, parts, counters, failed
        self._lock = threading.Lock()
        self._left = len(parts)
        self._nbytes = 0
        self._errors: list[BaseException] = []

    def jobs(self) -> list[Callable[[], None]]:
        return [lambda part=part: self._run(part) for part in self.parts]

    def _run(self, part: Callable[[], int]) -> None:
        error = None
        try:
            n = part()
        except Exception as e:
            error, n = e, 0
        with self._lock:
            self._nbytes += n
            if error is not None:
                self._errors.append(error)
            self._left -= 1
            last = self._left == 0
        if last:
            self._settle()
        if error is not None:
            raise error

    def _settle(self) -> None:
        if not self._errors:
            try:
                self.cache.pool.prepare_slot(self.s)
            except Exception as e:
                self._errors.append(e)
        error = self._errors[0] if self._errors else None
        self.cache._landed(self.s, self.counters, self.failed, nbytes=self._nbytes, error=error)
