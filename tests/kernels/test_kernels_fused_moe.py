"""Fused MoE: the Triton kernels (under TRITON_INTERPRET=1) and every CPU formulation against the dumb
reference, forward and backward, over a shape table whose rows say why they exist.

Shape legend: T tokens, D hidden, I expert hidden, S slots (experts), K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from moeflow.kernels import TileConfig, fused_moe, fused_moe_reference
from moeflow.kernels import cpu as kernels_cpu
from moeflow.kernels.backend import INTERPRETING
from moeflow.kernels.cpu import CPU_FORMULATIONS, GEMMS, builtin_plan, fused_moe_cpu

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 set before import (conftest)")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (rtol, atol as a fraction of max|reference|, bound on ||err|| / ||reference||) per dtype.
# fp32: IEEE dots, only summation order differs. fp16: a few half-ulp roundings of stored
# intermediates. bf16: the interpreter truncates fp32 -> bf16 (up to 1 ulp = 2^-7 relative per
# rounding), and the backward rounds twice more (stored dg/du, w * dout).
FWD_TOL = {"fp32": (1e-5, 1e-5, 1e-5), "fp16": (2e-3, 1e-3, 1e-3), "bf16": (1.6e-2, 1e-2, 1.2e-2)}
BWD_TOL = {"fp32": (1e-4, 1e-5, 1e-5), "fp16": (4e-3, 2e-3, 2e-3), "bf16": (3.2e-2, 2.5e-2, 2e-2)}

SMALL_TILE = TileConfig(block_m=16, block_n=32, block_k=32)


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    D: int
    I: int
    S: int
    K: int
    routing: str  # "topk", "one_slot", "skip_slot", "sentinels"
    why: str
    tile: TileConfig | None = None  # None: the interpreter's stored tile (64-wide)


CASES = [
    Case("decode", 1, 32, 32, 4, 2, "topk", "T=1: a single token; all but K blocks of the grid exit early"),
    Case("one_slot", 20, 32, 32, 4, 1, "one_slot", "all tokens to one expert: its run spans two 16-row blocks"),
    Case("idle_slot", 8, 32, 32, 4, 2, "skip_slot", "an expert with no tokens: it owns no block, gets zero grads"),
    Case("k_eq_e", 5, 32, 32, 3, 3, "topk", "K == E: every token uses every expert"),
    Case("prime_e", 6, 32, 32, 7, 2, "topk", "prime E: no power-of-two assumption on the slot count"),
    Case(
        "ragged",
        5,
        80,
        40,
        3,
        2,
        "topk",
        "D=80, I=40 not multiples of the 32 tile: masked tails in every GEMM and a 3-step K loop",
        SMALL_TILE,
    ),  # fmt: skip
    Case("sentinels", 6, 32, 32, 5, 3, "sentinels", "ids < 0 and >= S: pairs left to another wave contribute zero"),
]


def _ids(case: Case, gen: torch.Generator) -> torch.Tensor:
    T, S, K = case.T, case.S, case.K
    if case.routing == "one_slot":
        return torch.full((T, K), 2, dtype=torch.int64)
    pool = [s for s in range(S) if not (case.routing == "skip_slot" and s == 1)]
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(T)])
    if case.routing == "sentinels":
        ids[0, 1], ids[2, 0], ids[3, 2], ids[5, 1] = -1, S, S + 7, -5
    return ids


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.T, case.D, generator=gen)
    gate_up = torch.randn(case.S, 2 * case.I, case.D, generator=gen) * case.D**-0.5
    down = torch.randn(case.S, case.D, case.I, generator=gen) * case.I**-0.5
    weights = torch.rand(case.T, case.K, generator=gen).softmax(dim=-1)
    return hidden.to(dtype), gate_up.to(dtype), down.to(dtype), weights, _ids(case, gen)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float, float]) -> None:
    rtol, atol_frac, norm_tol = tol
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_frac * max(scale, 1e-6))
    if expected.norm() > 0:
        rel = ((actual - expected).norm() / expected.norm()).item()
        assert rel <= norm_tol, f"relative error {rel:.2e} > {norm_tol:.0e}"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_forward_matches_reference(case: Case, dtype_name: str) -> None:
    hidden, gate_up, down, weights, ids = make_inputs(case, DTYPES[dtype_name])
    out = fused_moe(hidden, gate_up, down, weights, ids, config=case.tile)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    assert_close_scaled(out, fused_moe_reference(hidden, gate_up, down, weights, ids), FWD_TOL[dtype_name])


def _grads(fn, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:4]]
    fn(*leaves, inputs[4]).backward(dout)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_backward_matches_reference(case: Case, dtype_name: str) -> None:
    inputs = make_inputs(case, DTYPES[dtype_name])
    dout = torch.randn(case.T, case.D, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype_name])
    got = _grads(lambda *a: fused_moe(*a, config=case.tile), inputs, dout)
    want = _grads(fused_moe_reference, inputs, dout)
    for name, g, w in zip(("hidden", "gate_up", "down", "weights"), got, want):
        assert g.dtype == w.dtype, name
        assert_close_scaled(g, w, BWD_TOL[dtype_name])
    if case.routing == "skip_slot":
        assert not got[1][1].any() and not got[2][1].any(), "an expert without tokens must get zero gradient"


def test_tolerances_catch_swapped_gate_and_up() -> None:
    """The bf16 tolerance, the loosest, still rejects a kernel that read up rows as gate rows."""
    case = CASES[0]
    hidden, gate_up, down, weights, ids = make_inputs(case, torch.bfloat16)
    out = fused_moe(hidden, gate_up, down, weights, ids)
    swapped = torch.cat([gate_up[:, case.I :], gate_up[:, : case.I]], dim=1)
    with pytest.raises(AssertionError):
        assert_close_scaled(out, fused_moe_reference(hidden, swapped, down, weights, ids), FWD_TOL["bf16"])


def test_triton_reads_a_strided_slot_pool_in_place() -> None:
    """The engine's pool: ids index slots of a bigger, non-contiguous tensor; no copy is needed."""
    gen = torch.Generator().manual_seed(3)
    T, D, I, S, K = 6, 32, 32, 9, 2
    big_gate_up = torch.randn(2 * S, 2 * I + 8, D + 16, generator=gen) * D**-0.5
    big_down = torch.randn(2 * S, D + 4, I, generator=gen) * I**-0.5
    gate_up_pool = big_gate_up[::2, : 2 * I, :D]  # every other slot, padded rows and columns left out
    down_pool = big_down[::2, :D]
    assert not gate_up_pool.is_contiguous() and not down_pool.is_contiguous()
    ids = torch.tensor([[8, 0], [3, 8], [8, 5], [0, 3], [5, 1], [1, 8]])
    weights = torch.rand(T, K, generator=gen)
    hidden = torch.randn(T, D, generator=gen)
    out = fused_moe(hidden, gate_up_pool, down_pool, weights, ids)
    want = fused_moe_reference(hidden, gate_up_pool, down_pool, weights, ids)
    assert_close_scaled(out, want, FWD_TOL["fp32"])


def test_triton_matches_transformers_grouped_mm() -> None:
    """Same numbers as transformers' own grouped_mm experts on a real MixtralExperts (fp32)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts, hidden, weights, ids = _mixtral_experts(T=9, D=48, I=40, E=5, K=2)
    with torch.no_grad():
        want = grouped_mm_experts_forward(experts, hidden, ids, weights)
        got = fused_moe(hidden, experts.gate_up_proj, experts.down_proj, weights, ids)
    assert_close_scaled(got, want, FWD_TOL["fp32"])


def _op_args(name: str) -> tuple[torch.library.CustomOpDef, tuple]:
    from moeflow.kernels.fused_moe import _backward_op, _forward_op
    from moeflow.kernels.metadata import _sort_pairs_op
    from moeflow.kernels.routing import _grouped_topk_sigmoid_op, _topk_softmax_op

    hidden, gate_up, down, weights, ids = make_inputs(CASES[1], torch.float32)  # one slot: padding rows
    tile = [16, 64, 64, 4, 1]
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    if name == "backward":
        _, act, preact, *meta = _forward_op(hidden, gate_up, down, weights, ids, tile, True)
        return _backward_op, (hidden.clone(), hidden, gate_up, down, weights, ids, act, preact, *meta, tile)
    return {
        "sort_pairs": (_sort_pairs_op, (ids, gate_up.shape[0], 16)),
        "topk_softmax": (_topk_softmax_op, (logits, 4, True)),
        "grouped_topk_sigmoid": (_grouped_topk_sigmoid_op, (logits, torch.zeros(16), 4, 4, 2, True, 2.5)),
        "forward": (_forward_op, (hidden, gate_up, down, weights, ids, tile, True)),
    }[name]


@pytest.mark.parametrize("name", ["sort_pairs", "topk_softmax", "grouped_topk_sigmoid", "forward", "backward"])
def test_custom_ops_pass_opcheck(name: str) -> None:
    """Schema, fake (meta) functions, and same outputs traced by torch.compile's AOT dispatcher (which
    fails if an output holds uninitialised memory, e.g. the padding rows of the activations)."""
    op, args = _op_args(name)
    torch.library.opcheck(op, args)


def test_forward_activations_are_zero_where_no_pair_sits() -> None:
    from moeflow.kernels.fused_moe import _forward_op

    hidden, gate_up, down, weights, ids = make_inputs(CASES[1], torch.float32)
    torch.manual_seed(0)
    _, act, preact, sorted_ids, *_ = _forward_op(hidden, gate_up, down, weights, ids, [16, 64, 64, 4, 1], True)
    padding = sorted_ids == ids.numel()
    assert padding.sum() > 16, "the case must have padding rows and whole unused blocks"
    assert not act[padding].any() and not preact[padding].any()
    assert act[~padding].abs().min() > 0


def test_zero_tokens() -> None:
    hidden, gate_up, down, weights, ids = make_inputs(CASES[0], torch.float32)
    out = fused_moe(hidden[:0], gate_up, down, weights[:0], ids[:0])
    assert out.shape == (0, hidden.shape[1])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "down": a["down"][:, :, :-1]}, "shapes disagree"),
        (lambda a: {**a, "ids": a["ids"][:, :1]}, "must both be"),
        (lambda a: {**a, "ids": a["ids"].float()}, "int32/int64"),
        (lambda a: {**a, "hidden": a["hidden"].half()}, "share a dtype"),
        (lambda a: {**a, "hidden": a["hidden"][None]}, "expected hidden"),
    ],
)
def test_bad_arguments_raise_value_error(mutate, message: str) -> None:  # noqa: ANN001
    hidden, gate_up, down, weights, ids = make_inputs(CASES[0], torch.float32)
    a = mutate({"hidden": hidden, "gate_up": gate_up, "down": down, "weights": weights, "ids": ids})
    with pytest.raises(ValueError, match=message):
        fused_moe(a["hidden"], a["gate_up"], a["down"], a["weights"], a["ids"])


# --------------------------------------------------------------------------------------------------
# CPU path (torch): every formulation, the dispatcher, and transformers parity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("formulation", list(CPU_FORMULATIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cpu_forward_matches_reference(case: Case, formulation: str, dtype_name: str) -> None:
    hidden, gate_up, down, weights, ids = make_inputs(case, DTYPES[dtype_name])
    with torch.no_grad():
        out = CPU_FORMULATIONS[formulation](hidden, gate_up, down, weights, ids)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    # The CPU path rounds like transformers (bf16 GEMM outputs, SiLU in bf16): two roundings, not one.
    tol = FWD_TOL[dtype_name] if dtype_name != "bf16" else (3.2e-2, 2e-2, 2e-2)
    assert_close_scaled(out, fused_moe_reference(hidden, gate_up, down, weights, ids), tol)


@pytest.mark.parametrize(
    "T, K, D, I, want",
    [
        (1, 2, 192, 192, "pair_loop[mm]"),  # the default model decoding: MKL's small calls win
        (1, 8, 1024, 512, "pair_loop[mm]"),  # one row per GEMM: MKL, which does not stall on a busy machine
        (2, 2, 1024, 2048, "pair_loop[mm]"),
        (4, 2, 512, 512, "sorted[onednn]"),  # several rows per expert from 2^18: oneDNN
        (16, 2, 384, 384, "sorted[onednn]"),  # from 2^17 with 16 pairs
        (4, 2, 384, 384, "grouped_mm"),  # too little work for oneDNN: grouped_mm beats a loop over slots
        (16, 2, 192, 192, "grouped_mm"),
    ],
)
def test_cpu_plan_follows_the_measured_crossovers(
    T: int, K: int, D: int, I: int, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # numpy's BLAS as it came (an engine loaded earlier in this process holds it to one thread, where one-row GEMMs
    # of big experts take it: tests/kernels/test_kernels_experts.py)
    monkeypatch.setattr(kernels_cpu, "_blas_threads", None)
    assert builtin_plan(T, K, D, I) == want


@pytest.fixture
def builtin_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan by the built-in crossovers even where this machine has stored measurements."""
    import moeflow.kernels as kernels

    monkeypatch.setattr(kernels.cpu, "measured_points", lambda key: ())


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``CPU_FORMULATIONS`` keys ``fused_moe_cpu`` called, in order (results unchanged)."""
    import moeflow.kernels as kernels

    names: list[str] = []

    def spy(name: str, fn):  # noqa: ANN001, ANN202
        return lambda *args: names.append(name) or fn(*args)

    formulations = {n: spy(n, f) for n, f in kernels.cpu.CPU_FORMULATIONS.items()}
    monkeypatch.setattr(kernels.cpu, "CPU_FORMULATIONS", formulations)
    return names


@pytest.mark.parametrize(
    "T, D, I, grad, want",
    [
        (1, 64, 96, False, "pair_loop[mm]"),
        (9, 64, 96, False, "grouped_mm"),
        (9, 64, 96, True, "grouped_mm"),  # grouped_mm has a CPU backward
        (9, 60, 30, False, "sorted[mm]"),  # I=30 fp32: 120-byte rows; grouped_mm would raise on the strides
        (9, 384, 384, False, "sorted[onednn]"),
        (9, 384, 384, True, "sorted[mm]"),  # oneDNN's inner product has no autograd formula
    ],
)
@pytest.mark.usefixtures("builtin_rules")
def test_cpu_dispatch_runs_the_planned_formulation(T: int, D: int, I: int, grad: bool, want: str, ran: list) -> None:
    gen = torch.Generator().manual_seed(T + D)
    S, K = 3, 2
    args = (torch.randn(T, D, generator=gen), torch.randn(S, 2 * I, D, generator=gen) * D**-0.5,
            torch.randn(S, D, I, generator=gen) * I**-0.5, torch.rand(T, K, generator=gen),
            torch.randint(0, S, (T, K), generator=gen))  # fmt: skip
    with torch.no_grad():
        want_out = CPU_FORMULATIONS[want](*args)
    args[1].requires_grad_(grad)
    got = fused_moe_cpu(*args)
    assert ran == [want] and torch.equal(got.detach(), want_out)


def test_cpu_rejects_an_unknown_gemm() -> None:
    hidden, gate_up, down, weights, ids = make_inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="cpu gemm"):
        fused_moe_cpu(hidden, gate_up, down, weights, ids, gemm="blas9000")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cpu_backward_matches_reference(case: Case, dtype_name: str) -> None:
    inputs = make_inputs(case, DTYPES[dtype_name])
    dout = torch.randn(case.T, case.D, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype_name])
    got = _grads(fused_moe_cpu, inputs, dout)
    want = _grads(fused_moe_reference, inputs, dout)
    tol = BWD_TOL[dtype_name] if dtype_name != "bf16" else (6.4e-2, 4e-2, 4e-2)
    for g, w in zip(got, want):
        assert_close_scaled(g, w, tol)


def _mixtral_experts(T: int, D: int, I: int, E: int, K: int, seed: int = 0):  # noqa: ANN202
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    experts = MixtralExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=D**-0.5)
    torch.nn.init.normal_(experts.down_proj, std=I**-0.5)
    hidden = torch.randn(T, D)
    probs = torch.randn(T, E).softmax(dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    return experts, hidden, weights / weights.sum(dim=-1, keepdim=True), ids


@pytest.mark.parametrize("T", [1, 4, 37])
@pytest.mark.parametrize("formulation", [*CPU_FORMULATIONS, *(f"dispatch[{g}]" for g in GEMMS)])
def test_cpu_matches_transformers_grouped_mm_fp32(formulation: str, T: int) -> None:
    """The engine's promise (greedy tokens identical to transformers) rests on this: fp32, ~1e-6.

    With torch.mm (MKL, as transformers) the differences are 0 to a few 1e-7; oneDNN sums in another
    order, measured up to 1.1e-6 of the largest output."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts, hidden, weights, ids = _mixtral_experts(T=T, D=64, I=96, E=8, K=2)
    gemm = formulation.split("[")[1].rstrip("]") if "[" in formulation else "mm"  # grouped_mm: MKL inside
    if formulation.startswith("dispatch"):
        fn = lambda *a: fused_moe_cpu(*a, gemm=gemm)  # noqa: E731
    else:
        fn = CPU_FORMULATIONS[formulation]
    tol = 1e-6 if gemm == "mm" else 2e-6
    with torch.no_grad():
        want = grouped_mm_experts_forward(experts, hidden, ids, weights)
        got = fn(hidden, experts.gate_up_proj, experts.down_proj, weights, ids)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_cpu_path_equals_triton_path() -> None:
    """``fused_moe`` gives the same result whichever path runs (fp32, sentinels included)."""
    case = next(c for c in CASES if c.name == "sentinels")
    hidden, gate_up, down, weights, ids = make_inputs(case, torch.float32)
    with torch.no_grad():
        cpu = fused_moe_cpu(hidden, gate_up, down, weights, ids)
    triton_out = fused_moe(hidden, gate_up, down, weights, ids)
    torch.testing.assert_close(triton_out, cpu, rtol=1e-5, atol=1e-5 * cpu.abs().max().item())
