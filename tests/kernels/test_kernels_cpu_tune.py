"""Per-machine CPU plans: `kernels.tune_cpu` measures and stores, `kernels.cpu.cpu_plan` follows."""

from __future__ import annotations

import json

import moeflow.kernels as kernels
import pytest
import torch
from moeflow.kernels.cpu import CPU_FORMULATIONS, builtin_plan, cpu_plan, fused_moe_cpu, machine_key
from moeflow.kernels.tune_cpu import applicable, measure, write


def test_machine_key_is_a_file_name_and_names_the_threads() -> None:
    key = machine_key()
    assert key.endswith(f"_{torch.get_num_threads()}t")
    assert all(c.isalnum() or c == "_" for c in key)


def test_measure_times_every_applicable_formulation_and_picks_the_fastest() -> None:
    points = measure(((16, 24), (12, 18)), (1, 40), ((2, 4),), rounds=2, progress=False)
    assert [(p["D"], p["K"], p["T"]) for p in points] == [(16, 2, 1), (16, 2, 40), (12, 2, 1), (12, 2, 40)]
    for p in points:
        gate_up, down = torch.zeros(4, 2 * p["I"], p["D"]), torch.zeros(4, p["D"], p["I"])
        assert set(p["ms"]) == {n for n in CPU_FORMULATIONS if applicable(n, gate_up, down, p["pairs"])}
        assert p["winner"] == min(p["ms"], key=p["ms"].get) and all(v > 0 for v in p["ms"].values())
    assert "pair_loop[mm]" not in points[1]["ms"]  # 80 pairs: past the pair loop's limit
    assert "grouped_mm" in points[1]["ms"]  # D=16, I=24 fp32: 64- and 96-byte rows
    assert "grouped_mm" not in points[2]["ms"]  # I=18 fp32: 72-byte rows, not a multiple of 16 bytes


@pytest.fixture
def stored(tmp_path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """`write(points)` stores a table for this machine under tmp_path, where `cpu_plan` reads it."""
    monkeypatch.setattr(kernels.cpu, "CONFIG_DIR", tmp_path)
    kernels.cpu.measured_points.cache_clear()
    yield lambda points: write(points, rounds=1)
    kernels.cpu.measured_points.cache_clear()


def _point(D: int, I: int, T: int, winner: str, K: int = 2) -> dict:
    return {"D": D, "I": I, "di": D * I, "K": K, "S": 8, "T": T, "pairs": K * T, "ms": {winner: 1.0}, "winner": winner}


def test_cpu_plan_follows_this_machines_measurements(stored) -> None:  # noqa: ANN001
    assert cpu_plan(16, 2, 384, 384) == builtin_plan(16, 2, 384, 384) == "sorted[onednn]"
    path = stored([_point(384, 384, 4, "sorted[mm]"), _point(384, 384, 64, "grouped_mm"),
                   _point(1024, 2048, 16, "pair_loop[mm]"), _point(384, 384, 4, "sorted[onednn]", K=8)])  # fmt: skip
    assert path.name == f"cpu_{machine_key()}.json" and json.loads(path.read_text())["points"]
    assert cpu_plan(32, 2, 384, 384) == "grouped_mm"  # 64 pairs: nearer to 128 than to 8 in log2
    assert cpu_plan(2, 2, 384, 384) == "sorted[mm]"
    assert cpu_plan(512, 2, 400, 360) == "grouped_mm"  # nearest size first, then nearest pair count
    assert cpu_plan(1, 2, 2048, 2048) == "pair_loop[mm]"
    assert cpu_plan(2, 8, 384, 384) == "sorted[onednn]"  # the same top-k before the nearest pair count
    # The dispatcher runs it (and still falls back when grouped_mm's strides do not fit).
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(16, 384, generator=gen), torch.randn(3, 768, 384, generator=gen) * 0.05,
            torch.randn(3, 384, 384, generator=gen) * 0.05, torch.rand(16, 2, generator=gen),
            torch.randint(0, 3, (16, 2), generator=gen))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(fused_moe_cpu(*args), CPU_FORMULATIONS["grouped_mm"](*args))


def test_a_stored_winner_this_build_lacks_is_ignored(stored) -> None:  # noqa: ANN001
    stored([_point(384, 384, 8, "sorted[blas9000]")])
    assert cpu_plan(8, 2, 384, 384) == builtin_plan(8, 2, 384, 384)
