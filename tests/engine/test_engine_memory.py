"""Honest memory: the budget is a hard ceiling, and loading reads no expert."""

import errno
import os

import moeflow
from moeflow.model.checkpoint import Checkpoint
from moeflow.offload.store import DiskStore

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]


class _InstrumentedStore:
    """Wraps the engine's store: checks every write lands inside the slot pool and the ceiling holds."""

    def __init__(self, engine: moeflow.Engine) -> None:
        self.inner = engine.cache.store
        self.direct_io = self.inner.direct_io
        self.cache = engine.cache
        pool = engine.cache.pool
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (pool.gate_up_S2ID, pool.down_SDI)]
        self.max_resident = 0
        self.reads = 0

    def _check(self, gate_up, down) -> None:
        for dest in (gate_up, down):
            assert any(lo <= dest.data_ptr() and dest.data_ptr() + dest.nbytes <= hi for lo, hi in self.ranges)
        resident = len(self.cache.resident())  # includes the slot being filled
        self.max_resident = max(self.max_resident, resident)
        assert resident <= self.cache.pool.capacity
        self.reads += 1

    def read_into(self, key, gate_up, down) -> int:
        self._check(gate_up, down)
        return self.inner.read_into(key, gate_up, down)

    def moves(self, key, gate_up, down, scales=None, **plan):  # a read sent to the reader process (the default)
        self._check(gate_up, down)
        return self.inner.moves(key, gate_up, down, scales, **plan)

    def moved(self, key, reply) -> None:
        self.inner.moved(key, reply)

    def close(self) -> None:
        self.inner.close()


def test_budget_is_a_ceiling(tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget="25%") as engine:
        probe = _InstrumentedStore(engine)
        engine.cache.store = probe
        engine.generate(PROMPT, max_new_tokens=16)
        stats = engine.stats()
        # No expert weights anywhere but the pool: the experts modules hold no parameters.
        for module in engine.model.modules():
            if hasattr(module, "_moeflow_layer"):
                assert module.gate_up_proj is None and module.down_proj is None
        expert_params = [n for n, _ in engine.model.named_parameters() if ".experts." in n]
        assert expert_params == []
        assert engine.cache.pool.nbytes <= stats.budget_bytes
    assert probe.reads == stats.misses > 0
    assert probe.max_resident == stats.capacity_slots  # the pool filled up, and never beyond
    assert stats.resident_peak_bytes <= stats.budget_bytes
    total_expert_bytes = len(engine.checkpoint.experts) * stats.slot_bytes
    assert stats.budget_bytes <= 0.25 * total_expert_bytes


def test_budget_in_bytes(tiny_checkpoints):
    path = tiny_checkpoints["olmoe"]
    with moeflow.load(path, expert_budget="all") as engine:
        slot = engine.cache.pool.slot_bytes
    with moeflow.load(path, expert_budget=f"{3 * slot + slot // 2}B") as engine:
        assert engine.cache.pool.capacity == 3  # rounded down: half a slot is never allocated
        engine.generate(PROMPT, max_new_tokens=4)
        assert engine.stats().resident_peak_bytes == 3 * slot


def test_load_reads_no_expert(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["qwen2_moe"]
    expert_reads = []
    dense_names = []
    original_read = DiskStore.read_into
    original_tensor = Checkpoint.read_tensor
    monkeypatch.setattr(
        DiskStore, "read_into", lambda self, key, *a: expert_reads.append(key) or original_read(self, key, *a)
    )
    monkeypatch.setattr(
        Checkpoint, "read_tensor", lambda self, name: dense_names.append(name) or original_tensor(self, name)
    )
    with moeflow.load(path, expert_budget="25%", store="disk") as engine:
        assert expert_reads == []
        assert not any(".experts." in n for n in dense_names)
        dense_bytes = sum(engine.checkpoint.tensors[n].nbytes for n in dense_names)
        assert dense_bytes < os.path.getsize(path / "model.safetensors") - engine.checkpoint.expert_bytes_on_disk + 1
        engine.generate(PROMPT, max_new_tokens=2)
        assert 0 < len(set(expert_reads)) < len(engine.checkpoint.experts)


def test_ram_store_holds_host_copy_but_pool_respects_budget(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%", store="ram") as engine:
        assert engine.cache.store.nbytes == len(engine.checkpoint.experts) * engine.cache.pool.slot_bytes
        engine.generate(PROMPT, max_new_tokens=4)
        assert engine.stats().resident_peak_bytes <= engine.stats().budget_bytes


def test_direct_io_refused_falls_back(tiny_checkpoints, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=6).token_ids
    with moeflow.load(path, expert_budget="25%") as engine:
        assert engine.stats().direct_io is False
        assert engine.generate(PROMPT, max_new_tokens=6).token_ids == ref
    assert "falling back to buffered reads" in caplog.text


def test_prefetch_hits_and_waste_are_counted(tiny_checkpoints):
    from moeflow import PrefetchPlan

    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="50%") as engine:
        layers = engine.cache.pool.capacity
        assert layers == 8
        # Prefetch every expert of layer 0 into an 8-slot pool, then use two of them.
        issued = engine.transfer.prefetch(PrefetchPlan(keys=tuple((0, e) for e in range(8))))
        engine.transfer.drain()
        assert issued == 8
        assert engine.cache.resident() == {(0, e) for e in range(8)}
        with engine.cache.acquire(0, [1, 2]) as slots:
            assert set(slots) == {1, 2}
        # Layer 1 now needs 6 slots: 6 unused prefetched experts are evicted, wasted.
        with engine.cache.acquire(1, [0, 1, 2, 3, 4, 5]):
            pass
        s = engine.stats()
    layer0 = s.per_layer[0]
    assert (layer0.hits, layer0.misses, layer0.prefetch_hits) == (2, 0, 2)
    assert layer0.wasted_prefetches == 6
    assert s.per_layer[1].misses == 6
    assert layer0.bytes_read >= 8 * s.slot_bytes


class _SlowPrefetchStore:
    """Wraps a store so reads by reader threads (prefetches here) take 0.3 s and say when they have started (the
    engines below read in threads: `read_process=False`)."""

    def __init__(self, inner):
        import threading

        self.inner = inner
        self.direct_io = inner.direct_io
        self.reads = []
        self.started = threading.Event()

    def read_into(self, key, gate_up, down):
        import threading
        import time

        self.reads.append(key)
        if threading.current_thread().name.startswith("moeflow-reader"):
            self.started.set()
            time.sleep(0.3)
        return self.inner.read_into(key, gate_up, down)

    def close(self):
        self.inner.close()


def test_prefetch_in_flight_is_waited_for_not_reread(tiny_checkpoints):
    import time

    from moeflow import PrefetchPlan

    with moeflow.load(tiny_checkpoints["qwen3_moe"], expert_budget="25%", read_process=False) as engine:
        inner = engine.cache.store
        engine.cache.store = store = _SlowPrefetchStore(inner)
        engine.transfer.prefetch(PrefetchPlan(keys=((0, 3),)))
        assert store.started.wait(5)  # the compute thread arrives while this read is in flight
        t0 = time.perf_counter()
        with engine.cache.acquire(0, [3]):
            waited = time.perf_counter() - t0
        engine.cache.store = inner
        s = engine.stats().per_layer[0]
    assert store.reads == [(0, 3)]  # read once, by the prefetch
    assert waited > 0.1
    assert (s.hits, s.misses, s.prefetch_hits) == (1, 0, 1)
    assert s.stall_s >= waited * 0.9


def test_queued_prefetch_is_read_by_the_compute_thread_not_waited_for(tiny_checkpoints, monkeypatch):
    """A needed expert whose prefetch waits behind another read is read on demand at once, and only once."""
    import time

    from moeflow import PrefetchPlan

    # one reader: the second prefetch stays queued
    with moeflow.load(tiny_checkpoints["qwen3_moe"], expert_budget="25%", readers=1, read_process=False) as engine:
        inner = engine.cache.store
        engine.cache.store = store = _SlowPrefetchStore(inner)
        engine.transfer.prefetch(PrefetchPlan(keys=((0, 1), (0, 3))))
        assert store.started.wait(5)  # (0, 1) is being read; (0, 3) is queued behind it
        t0 = time.perf_counter()
        with engine.cache.acquire(0, [3]):
            waited = time.perf_counter() - t0
        engine.transfer.drain()
        engine.cache.store = inner
        s = engine.stats().per_layer[0]
        assert engine.cache.resident() >= {(0, 1), (0, 3)}
    assert waited < 0.25  # did not wait for the slow read of (0, 1)
    assert sorted(store.reads) == [(0, 1), (0, 3)]  # (0, 3) read once: by the compute thread
    assert (s.hits, s.misses, s.prefetch_hits) == (0, 1, 0)


def test_correction_drops_wrong_predictions_still_queued(tiny_checkpoints):
    from moeflow import PrefetchPlan

    path = tiny_checkpoints["qwen3_moe"]
    with moeflow.load(path, expert_budget="25%", policy="predictive", predictor="gate", read_process=False) as engine:
        inner = engine.cache.store
        engine.cache.store = store = _SlowPrefetchStore(inner)
        prefetcher = engine.prefetcher
        engine.transfer.prefetch(PrefetchPlan(keys=((0, 0),)))  # keeps a reader busy
        assert store.started.wait(5)
        prefetcher.begin_step()
        layer = engine.checkpoint.moe_layers[0]
        prefetcher.fix_overlap(4.0)  # reads ahead are cheap: both confident guesses pay
        prefetcher.offer(layer, [[1, 2]], [[0.99, 0.99]])  # and layer 0 is within the lookahead: issued at once
        assert prefetcher.counters.issued == 2
        prefetcher.on_routing(layer, [1, 5])  # 2 was wrong and its read has not started: dropped
        assert prefetcher.counters.cancelled == 1
        assert (layer, 2) not in engine.cache.resident()
        engine.transfer.drain()
        prefetcher.end_step()
        engine.cache.store = inner
    assert (layer, 2) not in store.reads


def test_prefetch_keeps_output_exact(tiny_checkpoints):
    from moeflow import PrefetchPlan

    with moeflow.load(tiny_checkpoints["qwen3_moe"], expert_budget="all") as engine:
        ref = engine.generate(PROMPT, max_new_tokens=6).token_ids
    with moeflow.load(tiny_checkpoints["qwen3_moe"], expert_budget="25%") as engine:
        engine.transfer.prefetch(PrefetchPlan(keys=((0, 0), (0, 1), (1, 0), (1, 1))))
        engine.transfer.drain()  # the reads land before generation (else the compute thread may take them over)
        out = engine.generate(PROMPT, max_new_tokens=6).token_ids
        s = engine.stats()
    assert out == ref
    assert s.prefetch_hits >= 1
