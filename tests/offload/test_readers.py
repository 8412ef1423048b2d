"""The reader pool under the cache: demand misses read together, prefetch take-over, failed reads, the ceiling.

Synchronisation is by barriers and events, never by timing: a test that needs reads to overlap
deadlocks into a barrier timeout (a failure) if they do not.
"""

import threading
import time

import pytest
import torch

from moeflow.offload.cache import ExpertCache, SlotPool, SlotState
from moeflow.offload.plans import PrefetchPlan
from moeflow.offload.policy import LRUPolicy
from moeflow.offload.readers import ReaderPool
from moeflow.offload.transfer import TransferEngine

INTER, HIDDEN = 4, 8


class FakeStore:
    """Writes `layer * 100 + expert` into every element of the slot; hooks run before each write."""

    direct_io = False

    def __init__(self) -> None:
        self.reads: list[tuple[tuple[int, int], str]] = []  # (key, thread name)
        self.before: dict[tuple[int, int], object] = {}  # key -> callable run first (block, fail, ...)
        self._lock = threading.Lock()

    def read_into(self, key, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor) -> int:
        with self._lock:
            self.reads.append((key, threading.current_thread().name))
        hook = self.before.get(key)
        if hook is not None:
            hook()
        value = float(key[0] * 100 + key[1])
        gate_up_2ID.fill_(value)
        down_DI.fill_(value)
        return gate_up_2ID.nbytes + down_DI.nbytes

    def close(self) -> None:
        pass


def make_cache(capacity: int, readers: int, store: FakeStore | None = None) -> ExpertCache:
    pool = SlotPool(capacity=capacity, inter=INTER, hidden=HIDDEN, dtype=torch.float32, device=torch.device("cpu"))
    return ExpertCache(
        pool=pool, store=store or FakeStore(), policy=LRUPolicy(), layers=[0, 1], budget_bytes=pool.nbytes,
        readers=readers,
    )  # fmt: skip


def slot_value(cache: ExpertCache, s: int) -> float:
    return float(cache.pool.gate_up_S2ID[s].mean())


def test_demand_misses_of_a_layer_are_read_together():
    """Three misses, two readers: the three reads must all be in progress at once to pass the barrier."""
    store = FakeStore()
    barrier = threading.Barrier(3, timeout=10)

    def read() -> None:
        barrier.wait()
        time.sleep(0.03)

    for e in (1, 2, 3):
        store.before[(0, e)] = read
    cache = make_cache(capacity=4, readers=2, store=store)
    try:
        t0 = time.perf_counter()
        with cache.acquire(0, [1, 2, 3]) as slot_of:
            elapsed = time.perf_counter() - t0
            assert {e: slot_value(cache, s) for e, s in slot_of.items()} == {1: 1.0, 2: 2.0, 3: 3.0}
        threads = {name for _, name in store.reads}
        assert "MainThread" in threads and len(threads) == 3  # the compute thread read one of them itself
        stats = cache.stats()
        s = stats.per_layer[0]
        assert (s.misses, s.hits) == (3, 0)
        assert s.bytes_read == 3 * cache.pool.slot_bytes
        # Reading time: the reads' intervals together (each 30 ms at least, all at once), not their sum.
        assert 0.03 <= stats.reading_s <= elapsed
    finally:
        cache.close()


@pytest.mark.parametrize("readers", [0, 1])
def test_resident_experts_arrive_while_the_misses_are_read(readers):
    """`arrivals` hands out the resident experts at once and each miss when it lands: with a reader, the caller
    holds the hit while the miss is still being read (the read waits for the caller to have it); without
    one, the caller reads the miss itself when it asks for the next batch."""
    store = FakeStore()
    cache = make_cache(capacity=4, readers=readers, store=store)
    try:
        with cache.acquire(0, [1]):
            pass
        reading, handed_out = threading.Event(), threading.Event()

        def wait_for_the_hit() -> None:
            reading.set()
            if not handed_out.wait(10):
                raise AssertionError("the hit was not handed out before the miss landed")

        if readers:
            store.before[(0, 2)] = wait_for_the_hit
        with cache.arrivals(0, [2, 1]) as batches:
            first = next(batches)
            assert set(first) == {1} and slot_value(cache, first[1]) == 1.0
            if readers:
                assert reading.wait(10)  # the reader is reading the miss while the caller holds the hit
            handed_out.set()
            second = next(batches)
            assert set(second) == {2} and slot_value(cache, second[2]) == 2.0
            assert next(batches, None) is None
        assert store.reads[-1] == ((0, 2), "moeflow-reader-0" if readers else "MainThread")
        s = cache.stats().per_layer[0]
        assert (s.hits, s.misses) == (1, 2)
        assert all(slot.pins == 0 for slot in cache._slots)
    finally:
        cache.close()


def test_queued_prefetch_is_taken_over_by_the_compute_thread():
    """One reader, busy with one prefetch; the second prefetch is queued behind it. The layer that needs
    the second reads it itself at once (not waiting for the busy reader), and it is read only once."""
    store = FakeStore()
    reading, release = threading.Event(), threading.Event()
    store.before[(0, 1)] = lambda: (reading.set(), release.wait(10))
    cache = make_cache(capacity=4, readers=1, store=store)
    transfer = TransferEngine(cache)
    try:
        assert transfer.prefetch(PrefetchPlan(keys=((0, 1), (0, 2)))) == 2
        assert reading.wait(10)
        with cache.acquire(0, [2]) as slot_of:  # would deadlock here if it waited for the reader
            assert slot_value(cache, slot_of[2]) == 2.0
            assert not release.is_set()
        release.set()
        transfer.drain()
        assert sorted(store.reads) == [((0, 1), "moeflow-reader-0"), ((0, 2), "MainThread")]
        s = cache.stats().per_layer[0]
        assert (s.hits, s.misses, s.prefetch_hits) == (0, 1, 0)
        assert cache.resident() == {(0, 1), (0, 2)}
    finally:
        cache.close()


@pytest.mark.parametrize("readers", [0, 2])
def test_failed_demand_read_frees_its_slot_and_reaches_the_caller(readers):
    store = FakeStore()
    barrier = threading.Barrier(3, timeout=10) if readers else None

    def fail() -> None:
        if barrier is not None:
            barrier.wait()  # fail while the other two reads are still in flight
        raise OSError(5, "injected read error")

    store.before[(0, 2)] = fail
    if barrier is not None:
        store.before[(0, 1)] = store.before[(0, 3)] = barrier.wait
    cache = make_cache(capacity=4, readers=readers, store=store)
    try:
        with pytest.raises(OSError, match="injected read error"), cache.acquire(0, [1, 2, 3]):
            pytest.fail("the block must not run when a read failed")
        # The failed expert holds no slot; the others landed and stay usable; nothing is pinned.
        assert cache.resident() == {(0, 1), (0, 3)}
        assert [slot.state for slot in cache._slots].count(SlotState.FREE) == 2
        assert all(slot.pins == 0 for slot in cache._slots)
        del store.before[(0, 2)]
        with cache.acquire(0, [1, 2, 3]) as slot_of:
            assert {e: slot_value(cache, s) for e, s in slot_of.items()} == {1: 1.0, 2: 2.0, 3: 3.0}
        s = cache.stats().per_layer[0]
        assert (s.hits, s.misses) == (2, 4)
    finally:
        cache.close()


def test_failed_prefetch_gives_its_slot_back():
    def fail() -> None:
        raise OSError(5, "injected read error")

    store = FakeStore()
    store.before[(1, 0)] = fail
    cache = make_cache(capacity=2, readers=2, store=store)
    transfer = TransferEngine(cache)
    try:
        transfer.prefetch(PrefetchPlan(keys=((1, 0), (1, 1))))
        transfer.drain()
        assert cache.resident() == {(1, 1)}
    finally:
        cache.close()


def test_prefetch_that_fails_while_a_layer_waits_for_it_is_read_by_that_layer():
    store = FakeStore()
    cache = make_cache(capacity=2, readers=1, store=store)
    attempts = []
    pinned: list[bool] = []
    reading = threading.Event()

    def fail_once_the_layer_waits() -> None:
        attempts.append(threading.current_thread().name)
        if len(attempts) == 1:
            reading.set()
            deadline = time.monotonic() + 10
            with cache._cv:  # the compute thread has pinned the slot and waits for this read (pinning notifies
                while not any(slot.pins for slot in cache._slots) and time.monotonic() < deadline:  # no one)
                    cache._cv.wait(0.005)
                pinned.append(any(slot.pins for slot in cache._slots))  # checked below: an error here is a read's
            raise OSError(5, "injected read error")

    store.before[(0, 1)] = fail_once_the_layer_waits
    transfer = TransferEngine(cache)
    try:
        transfer.prefetch(PrefetchPlan(keys=((0, 1),)))
        assert reading.wait(10)  # the reader has started: the layer below waits for it rather than take it over
        with cache.acquire(0, [1]) as slot_of:
            assert slot_value(cache, slot_of[1]) == 1.0
        transfer.drain()
        assert attempts == ["moeflow-reader-0", "MainThread"]
        assert pinned == [True]  # the prefetch failed while the layer was waiting for it
        assert cache.resident() == {(0, 1)}
    finally:
        cache.close()


def test_ceiling_holds_with_reads_in_flight():
    """Prefetches and demand reads in flight together never occupy more than `capacity` slots, and a demand
    read waits for a slot rather than take one that is being written."""
    store = FakeStore()
    capacity = 3
    cache = make_cache(capacity=capacity, readers=3, store=store)
    in_flight, peak = 0, 0
    lock = threading.Lock()
    all_in_flight, release = threading.Event(), threading.Event()
    barrier = threading.Barrier(3, action=all_in_flight.set, timeout=10)

    def tracked(wait) -> object:
        def hook() -> None:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
                assert len(cache._slot_of) <= capacity
            wait()
            with lock:
                in_flight -= 1

        return hook

    def prefetch_wait() -> None:
        barrier.wait()  # the three prefetches are in flight at once...
        release.wait(10)  # ...and stay there until the demand acquire below is waiting for a slot

    def demand_wait() -> None:
        assert release.is_set(), "a demand read started while every slot was being written"

    for e in range(3):
        store.before[(0, e)] = tracked(prefetch_wait)
    for e in range(3, 8):
        store.before[(1, e)] = tracked(demand_wait)
    transfer = TransferEngine(cache)
    values: list[float] = []
    errors: list[BaseException] = []

    def compute() -> None:
        try:
            with cache.acquire(1, [3, 4, 5]) as slot_of:  # evicts the prefetched experts once they are READY
                values.extend(sorted(slot_value(cache, s) for s in slot_of.values()))
        except BaseException as e:
            errors.append(e)

    try:
        assert transfer.prefetch(PrefetchPlan(keys=((0, 0), (0, 1), (0, 2), (0, 3)))) == 3  # no 4th slot
        assert all_in_flight.wait(10)
        t = threading.Thread(target=compute)
        t.start()
        with cache._cv:  # the compute thread holds no slot while the three are being written
            cache._cv.wait_for(lambda: all(slot.state is SlotState.LOADING for slot in cache._slots), timeout=10)
            assert set(cache._slot_of) == {(0, 0), (0, 1), (0, 2)}
        release.set()
        t.join(10)
        assert errors == [] and values == [103.0, 104.0, 105.0]
        with cache.acquire(1, [6, 7]) as slot_of:
            assert sorted(slot_value(cache, s) for s in slot_of.values()) == [106.0, 107.0]
        transfer.drain()
        assert peak == 3
        assert cache.stats().resident_peak_bytes == capacity * cache.pool.slot_bytes
        assert cache.pool.nbytes <= cache.budget_bytes
    finally:
        release.set()
        cache.close()


def test_pool_runs_urgent_reads_before_background_ones():
    pool = ReaderPool(1)
    order: list[str] = []
    started, release = threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(10), order.append("busy")))
        assert started.wait(10)
        queued = pool.submit(lambda: order.append("background"))

        def urgent_from_another_thread() -> None:
            jobs = pool.start([lambda: order.append("urgent-0"), lambda: order.append("urgent-1")])
            while pool.help(jobs):
                pass
            pool.finish(jobs)

        t = threading.Thread(target=urgent_from_another_thread)
        t.start()
        t.join(10)
        assert sorted(order) == ["urgent-0", "urgent-1"]  # the caller ran both while the reader was busy
        release.set()
        pool.wait([queued])
        assert order[-2:] == ["busy", "background"]
    finally:
        pool.close()


def test_pool_close_drops_queued_background_reads():
    pool = ReaderPool(1)
    started, release = threading.Event(), threading.Event()
    pool.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    ran: list[str] = []
    queued = pool.submit(lambda: ran.append("dropped read"))
    closer = threading.Thread(target=pool.close)
    closer.start()
    pool.wait([queued])  # close() drops it while the reader is still busy
    release.set()
    closer.join(10)
    assert ran == [] and isinstance(queued.error, RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(lambda: None)


def test_a_finished_read_does_not_wake_the_idle_readers(monkeypatch):
    """Readers wait for work on their own condition: a read that finishes wakes its waiter, not the other readers
    (with one condition for both, each finished read woke all seven idle readers here, for nothing)."""
    wakes = [0]

    class CountingCondition(threading.Condition):
        def wait(self, timeout=None):
            try:
                return super().wait(timeout)
            finally:
                if threading.current_thread().name.startswith("moeflow-reader"):
                    wakes[0] += 1

    monkeypatch.setattr(threading, "Condition", CountingCondition)
    pool = ReaderPool(8)
    try:
        time.sleep(0.1)  # every reader is asleep
        wakes[0] = 0
        for _ in range(50):
            pool.wait([pool.submit(lambda: None)])
        assert wakes[0] <= 2 * 50, wakes[0]  # the reader that takes each read (and a rare spurious wake)
    finally:
        pool.close()


class PartedStore(FakeStore):
    """Reads each expert as `parts` parts (`DiskStore.read_parts`): part i fills gate_up row i (of 2 * INTER) and,
    the last one, down; hooks run before a part by (key, part)."""

    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts
        self.part_hooks: dict[tuple[tuple[int, int], int], object] = {}

    def read_parts(self, key, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, scales=None):
        assert scales is None
        value = float(key[0] * 100 + key[1])

        def part(i: int) -> int:
            with self._lock:
                self.reads.append((key, threading.current_thread().name))
            hook = self.part_hooks.get((key, i))
            if hook is not None:
                hook()
            rows = gate_up_2ID[i * 2 * INTER // self.parts : (i + 1) * 2 * INTER // self.parts]
            rows.fill_(value)
            if i == self.parts - 1:
                down_DI.fill_(value)
            return rows.nbytes + (down_DI.nbytes if i == self.parts - 1 else 0)

        return [lambda i=i: part(i) for i in range(self.parts)]


def test_parts_of_one_miss_are_read_at_once_and_the_slot_is_ready_after_the_last():
    """One miss in four parts, two readers and the compute thread: three parts in flight at once (a barrier), the
    slot still LOADING when each part starts, the expert handed out once all four have landed, bytes counted once."""
    store = PartedStore(parts=4)
    cache = make_cache(capacity=2, readers=2, store=store)
    barrier = threading.Barrier(3, timeout=10)
    states = []

    def hook(wait: bool) -> None:
        with cache._cv:
            states.append(cache._slots[cache._slot_of[(0, 5)]].state)
        if wait:
            barrier.wait()

    for i in range(4):
        store.part_hooks[((0, 5), i)] = lambda i=i: hook(i < 3)
    try:
        with cache.arrivals(0, [5]) as batches:
            seen = list(batches)
        assert states == [SlotState.LOADING] * 4
        assert len(seen) == 1 and slot_value(cache, seen[0][5]) == 5.0
        assert float(cache.pool.down_SDI[seen[0][5]].mean()) == 5.0
        assert len(store.reads) == 4 and len({name for _, name in store.reads}) == 3
        s = cache.stats().per_layer[0]
        assert (s.misses, s.bytes_read) == (1, cache.pool.slot_bytes)
    finally:
        cache.close()


@pytest.mark.parametrize("readers", [0, 2])
def test_a_failed_part_fails_the_read_and_frees_the_slot(readers):
    store = PartedStore(parts=3)

    def fail() -> None:
        raise OSError(5, "injected part error")

    store.part_hooks[((0, 2), 1)] = fail
    cache = make_cache(capacity=4, readers=readers, store=store)
    try:
        with pytest.raises(OSError, match="injected part error"), cache.acquire(0, [1, 2]):
            pytest.fail("the block must not run when a read failed")
        assert cache.resident() == {(0, 1)}
        assert all(slot.pins == 0 for slot in cache._slots)
        del store.part_hooks[((0, 2), 1)]
        with cache.acquire(0, [1, 2]) as slot_of:
            assert {e: slot_value(cache, s) for e, s in slot_of.items()} == {1: 1.0, 2: 2.0}
    finally:
        cache.close()


def test_a_layer_gets_an_expert_s_gate_up_half_while_its_down_matrix_is_read():
    """`arrivals`' `on_gate_up`: once a read has filled an expert's gate/up matrices (`_gate_up_landed`, which the
    reader process's early reply calls) the waiting layer is handed the expert at once, before its batch. The read
    ends only after the layer took the half, so the call cannot have come from the read's end; its time is not
    stall. A hit, or a read that lands whole, gives no half."""
    store = FakeStore()
    cache = make_cache(capacity=4, readers=1, store=store)
    reading, handed = threading.Event(), threading.Event()
    halves = []

    def fill_gate_up_then_wait() -> None:
        reading.set()
        s = cache._slot_of[(0, 2)]  # LOADING: the reader's alone
        cache.pool.gate_up_S2ID[s].fill_(2.0)
        cache.pool.down_SDI[s].fill_(-1.0)  # not read yet
        cache._gate_up_landed(s)
        if not handed.wait(10):
            raise AssertionError("the layer did not take the gate/up half while the down matrix was read")

    def on_gate_up(e: int, s: int) -> None:
        halves.append((e, slot_value(cache, s), cache._slots[s].state, float(cache.pool.down_SDI[s].mean())))
        time.sleep(0.05)  # computing the half: not stall
        handed.set()

    try:
        with cache.acquire(0, [1]):
            pass
        store.before[(0, 2)] = fill_gate_up_then_wait
        with cache.arrivals(0, [2, 1], on_gate_up) as batches:
            assert set(next(batches)) == {1}  # the hit
            assert reading.wait(10)  # the reader has the miss (else this thread would read it itself)
            seen = list(batches)
        assert halves == [(2, 2.0, SlotState.LOADING, -1.0)]  # gate/up in, down not yet
        assert len(seen) == 1 and slot_value(cache, seen[0][2]) == 2.0 and not cache._slots[seen[0][2]].gate_up_in
        assert cache.stats().per_layer[0].stall_s < 0.05
        with cache.arrivals(0, [2, 3], on_gate_up) as batches:  # a hit, and a read that lands whole
            assert {e for batch in batches for e in batch} == {2, 3}
        assert len(halves) == 1
    finally:
        cache.close()


def test_a_read_that_fails_after_its_gate_up_half_fails_the_layer_and_frees_the_slot():
    store = FakeStore()
    cache = make_cache(capacity=4, readers=1, store=store)
    reading = threading.Event()
    halves = []

    def half_then_fail() -> None:
        reading.set()
        cache._gate_up_landed(cache._slot_of[(0, 2)])
        deadline = time.monotonic() + 10
        while not halves and time.monotonic() < deadline:  # the layer takes the half first
            time.sleep(0.001)
        raise OSError(5, "the down matrix could not be read")

    try:
        with cache.acquire(0, [1]):
            pass
        store.before[(0, 2)] = half_then_fail
        with pytest.raises(OSError, match="down matrix"):
            with cache.arrivals(0, [2, 1], lambda e, s: halves.append(e)) as batches:
                next(batches)
                assert reading.wait(10)
                list(batches)
        assert halves == [2] and (0, 2) not in cache.resident()
        assert all(not slot.gate_up_in and slot.pins == 0 for slot in cache._slots)
    finally:
        cache.close()
