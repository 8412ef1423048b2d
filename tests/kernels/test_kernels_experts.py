"""``experts_forward``, the one expert-MLP entry of the engine and of training.

Its exact path against transformers' own grouped_mm experts, to the last bit; against the dumb reference
over the fused MoE's shape table plus rows of its own, forward and backward, with the default gate and
a family's (gpt-oss clamps); its fast path is ``fused_moe`` where that applies.

Shape letters: the legend in moeflow/__init__.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from types import SimpleNamespace

import moeflow.kernels.cpu as cpu
import pytest
import torch
from moeflow.kernels import (
    experts_forward,
    experts_rows,
    fused_moe,
    fused_moe_reference,
    pair_hidden,
    pair_row,
    weighted_sum,
)
from test_kernels_fused_moe import (
    BWD_TOL,
    CASES,
    DTYPES,
    FWD_TOL,
    Case,
    _grads,
    _mixtral_experts,
    assert_close_scaled,
    make_inputs,
)
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

# The exact path rounds like transformers (bf16 GEMM outputs, the gate in bf16): two roundings, not one.
EXACT_FWD_TOL = {**FWD_TOL, "bf16": (3.2e-2, 2e-2, 2e-2)}
EXACT_BWD_TOL = {**BWD_TOL, "bf16": (6.4e-2, 4e-2, 4e-2)}

# gpt-oss's gate: interleaved gate/up columns, both clamped, (up + 1) * gate * sigmoid(alpha * gate). A
# limit of 0.5 clamps a good share of these inputs, so a path that skipped the clamp would fail.
GPT_OSS_GATE = partial(GptOssExperts._apply_gate, SimpleNamespace(alpha=1.702, limit=0.5))
GATES = {"silu": None, "gpt_oss": GPT_OSS_GATE}

EXTRA_CASES = [
    Case("no_grouped_mm", 5, 30, 18, 3, 2, "topk",
         "D=30, I=18: rows of 120 and 72 fp32 bytes that grouped_mm refuses: the exact path's torch.mm loop"),
    Case("wave", 7, 32, 32, 6, 2, "wave",
         "the engine's wave: only slots 0-2 here, the rest -1; some tokens have no pair in this wave"),
    Case("decode_wave", 1, 32, 32, 4, 2, "wave", "T=1 (the per-pair loop) with a pair left to another wave"),
]  # fmt: skip


def inputs_for(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    if case.routing != "wave":
        return make_inputs(case, dtype)
    hidden, gate_up, down, weights, ids = make_inputs(dataclasses.replace(case, routing="topk"), dtype)
    S = case.S
    ids[0] = torch.tensor([1, S - 1])  # token 0: one pair in this wave, one in another
    if case.T > 1:
        ids[-1] = torch.tensor([S - 1, S - 2])  # the last token: none in this wave
    return hidden, gate_up, down, weights, torch.where(ids < 3, ids, -1)


TABLE = [*CASES, *EXTRA_CASES]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("gate_name", GATES)
@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.name)
def test_exact_forward_matches_reference(case: Case, gate_name: str, dtype_name: str) -> None:
    hidden, gate_up, down, weights, ids = inputs_for(case, DTYPES[dtype_name])
    gate = GATES[gate_name]
    with torch.no_grad():
        out = experts_forward(hidden, gate_up, down, weights, ids, gate=gate)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    want = fused_moe_reference(hidden, gate_up, down, weights, ids, gate=gate)
    assert_close_scaled(out, want, EXACT_FWD_TOL[dtype_name])


# Not gpt-oss in bf16: its clamps' gradient jumps at the limit, and a bf16 pre-activation within an ulp
# of it lands on the other side of the fp32 reference's (measured: 2 of 10240 gradient entries).
@pytest.mark.parametrize("gate_name, dtype_name", [("silu", "fp32"), ("silu", "bf16"), ("gpt_oss", "fp32")])
@pytest.mark.parametrize("case", TABLE, ids=lambda c: c.name)
def test_exact_backward_matches_reference(case: Case, gate_name: str, dtype_name: str) -> None:
    """Training differentiates the exact path with autograd: hidden, both pools and the routing weights."""
    inputs = inputs_for(case, DTYPES[dtype_name])
    dout = torch.randn(case.T, case.D, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype_name])
    gate = GATES[gate_name]
    got = _grads(partial(experts_forward, gate=gate), inputs, dout)
    want = _grads(partial(fused_moe_reference, gate=gate), inputs, dout)
    for name, g, w in zip(("hidden", "gate_up", "down", "weights"), got, want):
        assert g is not None and g.dtype == w.dtype, name
        assert_close_scaled(g, w, EXACT_BWD_TOL[dtype_name])
    if case.routing == "skip_slot":
        assert not got[1][1].any() and not got[2][1].any(), "an expert without tokens must get zero gradient"


@pytest.mark.parametrize("gate_name", ["module", "default"])
@pytest.mark.parametrize("fits", [True, False], ids=["grouped_mm", "mm_loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_exact_is_bit_identical_to_transformers(
    T: int, dtype: torch.dtype, fits: bool, gate_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's expert compute (T=1 takes its per-pair torch.mm path) equals transformers' grouped_mm
    experts to the last bit, also with pairs left to another wave (slot -1); with the module's own gate
    (what the engine passes) or the default; and where grouped_mm cannot take the pool (its torch.mm loop)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    if not fits:
        monkeypatch.setattr("moeflow.kernels.backend.grouped_mm_fits", lambda *args: False)
    experts, hidden, weights, ids = _mixtral_experts(T=T, D=64, I=96, E=8, K=2)
    experts, hidden = experts.to(dtype), hidden.to(dtype)
    gate = experts._apply_gate if gate_name == "module" else None
    for left_out in (None, 0, 1):  # which of token 0's pairs another wave computes (slot -1)
        slots, kept = ids.clone(), weights.clone()
        if left_out is not None:
            slots[0, left_out], kept[0, left_out] = -1, 0.0
        with torch.no_grad():
            want = grouped_mm_experts_forward(experts, hidden, ids, kept)
            got = experts_forward(hidden, experts.gate_up_proj, experts.down_proj, weights, slots, gate=gate)
        assert got.dtype == want.dtype and torch.equal(got, want), f"pair {left_out} left out"


def test_exact_reads_a_strided_slot_pool_in_place() -> None:
    """The engine's pool: slots of a bigger, non-contiguous tensor; the same bits as contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    T, D, I, S = 6, 32, 32, 9
    big_gate_up = torch.randn(2 * S, 2 * I + 8, D + 16, generator=gen) * D**-0.5
    big_down = torch.randn(2 * S, D + 4, I, generator=gen) * I**-0.5
    gate_up_pool, down_pool = big_gate_up[::2, : 2 * I, :D], big_down[::2, :D]
    assert not gate_up_pool.is_contiguous() and not down_pool.is_contiguous()
    ids = torch.tensor([[8, 0], [3, 8], [8, 5], [0, -1], [5, 1], [1, 8]])
    weights, hidden = torch.rand(T, 2, generator=gen), torch.randn(T, D, generator=gen)
    with torch.no_grad():
        out = experts_forward(hidden, gate_up_pool, down_pool, weights, ids)
        copied = experts_forward(hidden, gate_up_pool.contiguous(), down_pool.contiguous(), weights, ids)
    assert torch.equal(out, copied)
    assert_close_scaled(out, fused_moe_reference(hidden, gate_up_pool, down_pool, weights, ids), FWD_TOL["fp32"])


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("decode", "sentinels")], ids=lambda c: c.name)
def test_fast_path_is_fused_moe(case: Case) -> None:
    """exact=False with the default gate is ``kernels.fused_moe``, forward and backward."""
    inputs = make_inputs(case, torch.float32)
    dout = torch.randn(case.T, case.D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(experts_forward(*inputs, exact=False), fused_moe(*inputs))
    got = _grads(partial(experts_forward, exact=False), inputs, dout)
    for g, w in zip(got, _grads(fused_moe, inputs, dout)):
        assert torch.equal(g, w)


def test_fast_path_with_a_family_gate_is_the_exact_path() -> None:
    """The Triton kernels fuse SiLU-and-mul; a family's own gate runs the exact path instead."""
    inputs = make_inputs(next(c for c in CASES if c.name == "sentinels"), torch.float32)
    with torch.no_grad():
        fast = experts_forward(*inputs, gate=GPT_OSS_GATE, exact=False)
        assert torch.equal(fast, experts_forward(*inputs, gate=GPT_OSS_GATE))
        assert not torch.allclose(fast, experts_forward(*inputs), rtol=1e-2, atol=1e-3), "the gate must matter"


@pytest.mark.parametrize("blas", [False, True], ids=["planned", "blas"])
@pytest.mark.parametrize("gate_name", GATES)
@pytest.mark.parametrize("case", [c for c in TABLE if c.name in ("decode", "sentinels", "decode_wave", "wave")],
                         ids=lambda c: c.name)  # fmt: skip
def test_fast_rows_are_the_exact_rows_within_rounding(case: Case, gate_name: str, blas: bool, monkeypatch) -> None:
    """experts_rows(exact=False), what the engine computes with --kernels fast on the CPU: the planned formulation
    (with one BLAS thread and every size above the cut: numpy's BLAS for one-row GEMMs) with a family's gate; its
    weighted sum within fp32 rounding of the exact output; -1 slots give zero rows."""
    if blas:
        monkeypatch.setattr(cpu, "_blas_threads", 1)
        monkeypatch.setattr(cpu, "BLAS_MIN_DI", 0)
    hidden, gate_up, down, weights, ids = inputs_for(case, torch.float32)
    calls = []
    monkeypatch.setitem(cpu.GEMMS, "blas", lambda x, w, _f=cpu.GEMMS["blas"]: calls.append(1) or _f(x, w))
    with torch.no_grad():
        rows = experts_rows(hidden, gate_up, down, ids, gate=GATES[gate_name], exact=False)
        want = experts_rows(hidden, gate_up, down, ids, gate=GATES[gate_name])
        assert_close_scaled(rows, want, FWD_TOL["fp32"])
        assert not rows[(ids.reshape(-1) < 0)].any()
        out = weighted_sum(rows, weights, torch.float32)
        assert_close_scaled(out, experts_forward(hidden, gate_up, down, weights, ids, gate=GATES[gate_name]),
                            FWD_TOL["fp32"])  # fmt: skip
    assert bool(calls) == (blas and case.T <= 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("gate_name", GATES)
def test_one_token_s_rows_in_two_halves_are_the_exact_rows_bit_for_bit(gate_name: str, dtype: str) -> None:
    """pair_row(pair_hidden(...)): a layer computes an expert's gate/up half while its down matrix is still read
    (the engine's early replies); each pair's row must be experts_rows' to the last bit, so greedy tokens stay
    transformers'."""
    case = next(c for c in TABLE if c.name == "decode_wave")
    hidden, gate_up, down, _, ids = inputs_for(case, DTYPES[dtype])
    with torch.no_grad():
        want = experts_rows(hidden, gate_up, down, ids, gate=GATES[gate_name])
        for p, s in enumerate(ids.reshape(-1).tolist()):
            if s < 0:
                continue
            got = pair_row(pair_hidden(hidden, gate_up[s], gate=GATES[gate_name]), down[s])
            assert torch.equal(got, want[p : p + 1]), (p, s)
    assert (ids < 0).any() and (ids >= 0).any()  # the case has a pair of another wave, which stays zero above


def test_the_plan_takes_blas_only_on_one_blas_thread(monkeypatch) -> None:
    """One-row GEMMs of big experts go to numpy's BLAS only while it runs on one thread (with more, its calls stall
    when another process wants a core); small ones and several rows per expert stay where they were."""
    monkeypatch.setattr(cpu, "_blas_threads", None)
    assert cpu.builtin_plan(1, 2, 192, 8192) == "pair_loop[mm]"
    monkeypatch.setattr(cpu, "_blas_threads", 2)
    assert cpu.builtin_plan(1, 2, 192, 8192) == "pair_loop[mm]"
    monkeypatch.setattr(cpu, "_blas_threads", 1)
    assert cpu.builtin_plan(1, 2, 192, 8192) == "pair_loop[blas]"
    assert cpu.builtin_plan(1, 2, 192, 192) == "pair_loop[mm]"  # 2^15: a tie, MKL kept
    assert cpu.builtin_plan(2, 2, 256, 256) == "pair_loop[mm]"  # two rows: BLAS from 2^17
    assert cpu.builtin_plan(2, 2, 384, 384) == "pair_loop[blas]"
    assert cpu.builtin_plan(16, 2, 384, 384) == "sorted[onednn]"


@pytest.mark.parametrize("exact", [True, False])
def test_zero_tokens(exact: bool) -> None:
    hidden, gate_up, down, weights, ids = make_inputs(CASES[0], torch.float32)
    out = experts_forward(hidden[:0], gate_up, down, weights[:0], ids[:0], exact=exact)
    assert out.shape == (0, hidden.shape[1])


@pytest.mark.parametrize("exact", [True, False])
def test_mismatched_dtypes_raise_value_error(exact: bool) -> None:
    hidden, gate_up, down, weights, ids = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        experts_forward(hidden.bfloat16(), gate_up, down, weights, ids, exact=exact)
