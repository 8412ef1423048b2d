"""`DiskStore`'s byte-copy reads: an expert whose pieces are plain byte copies is read with `preadv` and one
`memmove` per piece, no torch call (each would hand the GIL back and forth with the compute thread), and fills its
slot exactly as the torch copy path does."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moeflow
from moeflow.testing import save_tiny_checkpoint
from moeflow.tools.quantize import quantize_checkpoint


@pytest.fixture(scope="module")
def folders(family_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes")
    src = save_tiny_checkpoint("mixtral", root / "fp32", intermediate_size=64)
    return {"fp32": src, "int8": quantize_checkpoint(src, root / "int8", "int8", progress=False),
            "int4": quantize_checkpoint(src, root / "int4", "int4", group_size=32, progress=False),
            "gpt_oss": family_checkpoints["gpt_oss"]}  # fmt: skip


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
