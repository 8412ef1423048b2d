"""`DiskStore.read_parts`: an expert read as parts, by any threads in any order, fills its slot as one read does."""

import random

import pytest
import torch

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

    with moeflow.load(folders[kind], expert_budget="25%", store="disk", readers=2) as engine:
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
