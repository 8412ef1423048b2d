"""Reads straight into a slot: where an expert's pieces lie on whole blocks of its file and of its slot (the slot
pool is page-aligned; `moeflow.tools.widen` writes such checkpoints), `DiskStore` reads them with O_DIRECT into the
slot itself, no bounce buffer, no copy, a gate piece and its up piece in one request; the slot holds exactly what
the buffered path puts there."""

import logging
import random
import shutil
import threading

import pytest
import torch

import moeflow
from moeflow.model.checkpoint import open_checkpoint
from moeflow.offload.store import _destinations
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


@pytest.fixture(scope="module")
def int8_folders(folders, tmp_path_factory):
    """A model with 32 KiB int8 experts' weights as `moeflow quantize` writes it, and the same tensors as it wrote
    them before (each expert's tensors back to back in the source's order: a down projection's 128-byte scales put
    every later tensor off whole pages)."""
    from safetensors.torch import load_file

    from moeflow.tools.quantize import quantize_checkpoint, save_ordered

    root = tmp_path_factory.mktemp("int8")
    wide = widen_experts(folders["packed"], root / "wide", 1024, progress=False)
    paged = quantize_checkpoint(wide, root / "paged", "int8", progress=False)
    old = root / "old"
    shutil.copytree(paged, old)
    for shard in old.glob("*.safetensors"):
        tensors = {name: t.clone() for name, t in load_file(shard).items()}  # not the mapped file being rewritten
        # experts first, each one's tensors by name (w1, its scale, w2, its scale, w3, ...), then the others
        save_ordered(dict(sorted(tensors.items(), key=lambda item: (".experts." not in item[0], item[0]))), shard)
    return {"paged": paged, "old": old}


def _int8_plan_and_read(path):
    """Each expert's byte plan into slot 0, its read checked to fill the slot as a read through the buffer does."""
    with moeflow.load(path, expert_budget="all") as engine:
        pool, store = engine.cache.pool, engine.cache.store
        for key in engine.checkpoint.experts:
            scales = pool.scale_views(0)
            dests = _destinations(pool.gate_up_S2ID[0], pool.down_SDI[0], scales)
            plan = store._byte_plan(key, dests)
            for t in dests:
                t.zero_()
            store.read_into(key, pool.gate_up_S2ID[0], pool.down_SDI[0], scales)
            off = [_misaligned_like(t) for t in dests]
            assert not any(r.direct for r in store._byte_plan(key, tuple(off)))
            store.read_into(key, off[0], off[1], {"gate_up": off[2], "down": off[3]})
            assert all(torch.equal(a, b) for a, b in zip(dests, off)) and dests[0].any()
            yield key, plan


def test_a_quantized_folder_lies_on_whole_pages_and_is_read_into_the_slot(int8_folders):
    """`moeflow quantize` writes every expert's tensors of whole pages first, in the slot's order, the smaller ones
    after them: gate and up weights come in one request straight into the slot, their scales in another, the down
    weights in a third, and only the down projection's small scales through the buffer."""
    ckpt = open_checkpoint(int8_folders["paged"])
    for loc in ckpt.experts.values():
        assert all(s.offset % 4096 == 0 for s in loc.spans if s.nbytes % 4096 == 0)
    for _, plan in _int8_plan_and_read(int8_folders["paged"]):
        assert [(r.direct, len(r.pieces)) for r in plan] == [(True, 2), (True, 2), (True, 1), (False, 1)]


def test_pieces_on_whole_pages_are_read_into_the_slot_beside_others_through_the_buffer(int8_folders):
    """A folder written before: some pieces on whole pages, those after a small scale not. The first land in the slot,
    the others go through the buffer in runs that span no direct piece (no byte read twice)."""
    mixed = 0
    for _, plan in _int8_plan_and_read(int8_folders["old"]):
        direct = [r for r in plan if r.direct]
        mixed += 0 < len(direct) < len(plan)
        for r in plan:
            if not r.direct:
                assert not any(d.file == r.file and r.start < d.end and d.start < r.end for d in direct)
    assert mixed  # (each shard's first expert: the tensors after its w2 scale are off whole pages)
