"""`DiskStore` reads: an expert read as parts, by any threads in any order, fills its slot as one read does; and an
expert whose pieces are plain byte copies is read with `preadv` and one `memmove` per piece, no torch call (each would
hand the GIL back and forth with the compute thread), filling its slot exactly as the torch copy path does."""

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moeflow
from moeflow.testing import save_tiny_checkpoint
from moeflow.tools.quantize import quantize_checkpoint


@pytest.fixture(scope="module")
def folders(family_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    # experts wide enough that even int4 ones span several 4 KiB blocks (3 x 512 x 32 x 4 bytes in fp32)
    src = save_tiny_checkpoint("mixtral", root / "fp32", intermediate_size=512)
    return {"fp32": src, "int8": quantize_checkpoint(src, root / "int8", "int8", progress=False),
            "int4": quantize_checkpoint(src, root / "int4", "int4", group_size=32, progress=False),
            "gpt_oss": family_checkpoints["gpt_oss"]}  # fmt: skip


def _slot(pool, s):
    return [pool.gate_up_S2ID[s], pool.down_SDI[s], *(pool.scale_views(s) or {}).values()]


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_parts_in_any_order_fill_the_slot_as_one_read(folders, kind):
    with moeflow.load(folders[kind], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        store.part_bytes = 4096
        for key in list(engine.checkpoint.experts)[:4]:
            for t in _slot(pool, 0) + _slot(pool, 1):
                t.zero_()
            whole = store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0], pool.scale_views(0) or None)
            parts = store.read_parts(key, pool.gate_up_S2ID[1], pool.down_SDI[1], pool.scale_views(1) or None)
            assert parts is not None and len(parts) >= 2
            random.Random(key[1]).shuffle(parts)
            assert sum(part() for part in parts) == whole  # the same blocks of the file, once each
            assert all(torch.equal(a, b) for a, b in zip(_slot(pool, 0), _slot(pool, 1), strict=True))
            assert _slot(pool, 1)[0].any()


def test_experts_outside_the_parted_range_or_not_byte_copies_are_read_whole(folders):
    with moeflow.load(folders["fp32"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        key = next(iter(engine.checkpoint.experts))
        assert store.read_parts(key, pool.gate_up_S2ID[0], pool.down_SDI[0]) is None  # under two 1 MiB parts
        store.part_bytes = 4096
        assert store.read_parts(key, pool.gate_up_S2ID[0], pool.down_SDI[0]) is not None
        store.parted_max_bytes = 8192  # over the ceiling (as an 18 MiB fp32 expert is over 8 MiB)
        assert store.read_parts(key, pool.gate_up_S2ID[0], pool.down_SDI[0]) is None
    with moeflow.load(folders["gpt_oss"], expert_budget="all") as engine:  # transposed on disk: copied through .t()
        pool, store = engine.cache.pool, engine.cache.store
        store.part_bytes = 4096
        key = next(iter(engine.checkpoint.experts))
        assert store.read_parts(key, pool.gate_up_S2ID[0], pool.down_SDI[0]) is None


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_reserved_read_buffers_are_taken_by_the_reading_threads(folders, kind):
    """The engine maps a read buffer per reader and one for the compute thread as it opens the store
    (`DiskStore.reserve_buffers`: pages faulted before anything else can free memory); reads take those."""
    import threading

    with moeflow.load(folders[kind], expert_budget="25%", store="disk", readers=2, read_process=False) as engine:
        store, pool = engine.cache.store, engine.cache.pool
        largest = max(store._read_bytes(k, k in store._scales) for k in engine.checkpoint.experts)
        reserved = list(store._reserved)
        assert len(reserved) == 3  # two readers and the compute thread
        assert all(len(b) >= largest for b in reserved)
        keys = list(engine.checkpoint.experts)[:2]
        expected = []
        for s, key in enumerate(keys):  # the reference: read by this thread
            store.read_into(key, pool.gate_up_S2ID[s], pool.down_SDI[s], pool.scale_views(s) or None)
            expected.append([t.clone() for t in _slot(pool, s)])
            for t in _slot(pool, s):
                t.zero_()
        taken = []

        def read(s: int, key) -> None:
            store.read_into(key, pool.gate_up_S2ID[s], pool.down_SDI[s], pool.scale_views(s) or None)
            taken.append(store._local.buf)

        threads = [threading.Thread(target=read, args=(s, key)) for s, key in enumerate(keys)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(any(b is r for r in reserved) for b in taken)  # no thread mapped a buffer of its own
        for s in range(len(keys)):
            assert all(torch.equal(a, b) for a, b in zip(_slot(pool, s), expected[s], strict=True))
    assert store._reserved == []  # unmapped with the store


def _strided_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of `t`'s shape and dtype that is not contiguous: the torch copy path's destination."""
    return torch.zeros(t.shape[::-1], dtype=t.dtype).t()


class _TorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
def test_a_byte_copy_read_fills_the_slot_as_the_torch_copy_does(folders, kind):
    with moeflow.load(folders[kind], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        scales = pool.scale_views(0) or None
        strided_scales = {name: _strided_like(t) for name, t in scales.items()} if scales else None
        for key in list(engine.checkpoint.experts)[:4]:
            for t in (pool.gate_up_S2ID[0], pool.down_SDI[0], *(scales or {}).values()):
                t.zero_()
            gate_up, down = _strided_like(pool.gate_up_S2ID[0]), _strided_like(pool.down_SDI[0])
            n = store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0], scales)
            assert store.read_into(key, gate_up, down, strided_scales) == n
            assert torch.equal(pool.gate_up_S2ID[0], gate_up) and torch.equal(pool.down_SDI[0], down)
            assert pool.gate_up_S2ID[0].any() and pool.down_SDI[0].any()
            if scales:
                assert all(torch.equal(scales[name], strided_scales[name]) for name in scales)
            # the slot's read was the byte-copy one, the strided destinations' the torch one
            assert store._byte_plan(key, (pool.gate_up_S2ID[0], pool.down_SDI[0], *(scales or {}).values()))
            assert store._byte_plan(key, (gate_up, down, *(strided_scales or {}).values())) is None


def test_a_byte_copy_read_makes_no_torch_call_but_to_find_its_destinations(folders):
    with moeflow.load(folders["fp32"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        key = next(iter(engine.checkpoint.experts))
        store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0])  # the first read plans (and checks NaN/Inf)
        gate_up, down = pool.gate_up_S2ID[1], pool.down_SDI[1]
        with _TorchCalls() as calls:
            store.read_into(key, gate_up, down)
        # the layout that finds the remembered plan (shape, dtype, device, stride), then each destination's address
        assert set(calls.names) <= {"__get__", "stride", "data_ptr"}, calls.names
        assert calls.names.count("data_ptr") == 2
        assert torch.equal(pool.gate_up_S2ID[0], gate_up) and torch.equal(pool.down_SDI[0], down)


def test_pieces_stored_transposed_are_copied_by_torch(folders):
    with moeflow.load(folders["gpt_oss"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        key = next(iter(engine.checkpoint.experts))
        assert store._byte_plan(key, (pool.gate_up_S2ID[0], pool.down_SDI[0])) is None
        store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
        assert pool.gate_up_S2ID[0].any()
