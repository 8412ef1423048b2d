"""Reads straight into a slot: where an expert's pieces lie on whole blocks of its file and of its slot (the slot
pool is page-aligned; `moeflow.tools.widen` writes such checkpoints), `DiskStore` reads them with O_DIRECT into the
slot itself, no bounce buffer, no copy, a gate piece and its up piece in one request; the slot holds exactly what
the buffered path puts there."""

import logging
import random
import threading

import pytest
import torch

import moeflow
from moeflow.model.checkpoint import open_checkpoint
from moeflow.testing import save_tiny_checkpoint
from moeflow.tools.widen import widen_experts

WIDE = 128  # a piece of 128 x 32 fp32 values is 16 KiB: whole pages


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    src = save_tiny_checkpoint("mixtral", root / "src", intermediate_size=64, hidden_size=32)
    return {"packed": src, "aligned": widen_experts(src, root / "aligned", WIDE, progress=False)}


def _misaligned_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of `t`'s shape and dtype whose address is off a page by 64 bytes."""
    raw = torch.empty(t.nbytes + 8192, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % 4096 + 64
    return raw[skip : skip + t.nbytes].view(t.dtype).view(t.shape)


def test_widened_shards_hold_every_expert_on_whole_pages_in_slot_order(folders):
    ckpt = open_checkpoint(folders["aligned"])
    for loc in ckpt.experts.values():
        assert all(span.offset % 4096 == 0 and span.nbytes % 4096 == 0 for span in loc.spans)
        by_offset = sorted(loc.pieces, key=lambda p: p.span.offset)
        # gate rows, then up rows (back to back), then down
        assert [(p.param, p.row) for p in by_offset] == [("gate_up", 0), ("gate_up", WIDE), ("down", 0)]
        assert by_offset[0].span.offset + by_offset[0].span.nbytes == by_offset[1].span.offset


def test_aligned_pieces_are_read_into_the_slot_and_fill_it_as_the_buffered_path(folders):
    with moeflow.load(folders["aligned"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        assert pool.gate_up_S2ID.data_ptr() % 4096 == 0 and pool.down_SDI[1].data_ptr() % 4096 == 0
        for key in list(engine.checkpoint.experts)[:6]:
            gate_up, down = pool.gate_up_S2ID[0], pool.down_SDI[0]
            plan = store._byte_plan(key, (gate_up, down))
            assert [r.direct for r in plan] == [True, True]  # gate + up in one request, down in another
            assert sorted(len(r.pieces) for r in plan) == [1, 2]
            gate_up.zero_()
            down.zero_()
            n = store.read_into(key, gate_up, down)
            assert n == sum(span.nbytes for span in engine.checkpoint.experts[key].spans)  # no byte read twice
            off_gate_up, off_down = _misaligned_like(gate_up), _misaligned_like(down)
            buffered = store._byte_plan(key, (off_gate_up, off_down))
            assert buffered is not None and not any(r.direct for r in buffered)
            assert store.read_into(key, off_gate_up, off_down) == n
            assert torch.equal(gate_up, off_gate_up) and torch.equal(down, off_down) and gate_up.any()


def test_direct_parts_in_any_order_fill_the_slot_without_a_buffer(folders):
    with moeflow.load(folders["aligned"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        store.part_bytes = 4096
        key = next(iter(engine.checkpoint.experts))
        store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
        parts = store.read_parts(key, pool.gate_up_S2ID[1], pool.down_SDI[1])
        assert parts is not None and len(parts) >= 4
        random.Random(0).shuffle(parts)
        buffers = []

        def run() -> None:  # a fresh thread: any bounce buffer it needed would be its own
            for part in parts:
                part()
            buffers.append(getattr(store._local, "buf", None))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert buffers == [None]
        assert torch.equal(pool.gate_up_S2ID[0], pool.gate_up_S2ID[1])
        assert torch.equal(pool.down_SDI[0], pool.down_SDI[1])


def test_a_checkpoint_off_whole_pages_is_read_through_the_buffer(folders):
    with moeflow.load(folders["packed"], expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        key = next(iter(engine.checkpoint.experts))
        plan = store._byte_plan(key, (pool.gate_up_S2ID[0], pool.down_SDI[0]))
        assert plan is not None and not any(r.direct for r in plan)


def test_a_direct_read_still_finds_nan_weights(folders, tmp_path, caplog):
    import shutil

    bad = shutil.copytree(folders["aligned"], tmp_path / "bad")
    ckpt = open_checkpoint(bad)
    key = next(iter(ckpt.experts))
    down = next(p.span for p in ckpt.experts[key].pieces if p.param == "down")
    with open(down.file, "r+b") as f:  # the last value of the expert's down piece
        f.seek(down.offset + down.nbytes - 4)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())
    with moeflow.load(bad, expert_budget="all") as engine, caplog.at_level(logging.WARNING):
        pool = engine.cache.pool
        assert all(r.direct for r in engine.cache.store._byte_plan(key, (pool.gate_up_S2ID[0], pool.down_SDI[0])))
        engine.cache.store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
    assert any("NaN or Inf" in r.getMessage() and f"expert {key[1]} of layer {key[0]}" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_no_read_buffer_is_reserved_where_every_expert_lies_on_whole_blocks(folders):
    with moeflow.load(folders["aligned"], expert_budget="25%", store="disk", readers=2) as engine:
        assert engine.cache.store._reserved == []  # every read lands in a slot
        assert engine.generate([1, 2, 3], max_new_tokens=4).token_ids  # and decoding reads through them
    with moeflow.load(folders["packed"], expert_budget="25%", store="disk", readers=2, read_process=False) as engine:
        assert len(engine.cache.store._reserved) == 3  # two reader threads and the compute thread
    with moeflow.load(folders["packed"], expert_budget="25%", store="disk", readers=2) as engine:
        assert engine.cache.in_process  # the default
        assert len(engine.cache.store._reserved) == 1  # the compute thread: the reader process maps its own
