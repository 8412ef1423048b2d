"""The compiled Triton kernels on a GPU against the CPU references, over the interpreter suites' tables.

Runs only where a CUDA device is present and the interpreter is off; on a GPU machine:

    TRITON_INTERPRET=0 python -m pytest tests/kernels/test_kernels_gpu.py

The references run on the CPU from the same inputs, so a GPU result is checked against the same
numbers the interpreter tests check against, with the same per-dtype tolerances. The engine part
checks that greedy decoding with the slot pool on the GPU equals plain transformers on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from moeflow.kernels import (
    fused_moe,
    fused_moe_reference,
    grouped_topk_sigmoid,
    grouped_topk_sigmoid_reference,
    sort_pairs,
    sort_pairs_reference,
    topk_softmax,
    topk_softmax_reference,
)
from moeflow.kernels.backend import INTERPRETING
from test_kernels_fused_moe import BWD_TOL, CASES, DTYPES, FWD_TOL, _grads, assert_close_scaled, make_inputs
from test_kernels_metadata import CASES as SORT_CASES
from test_kernels_metadata import _ids as sort_ids
from test_kernels_routing import GROUPED_CASES, SOFTMAX_CASES

pytestmark = pytest.mark.skipif(
    INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA device and TRITON_INTERPRET unset or 0"
)

CUDA = torch.device("cuda")


def _cuda(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(CUDA) for t in tensors)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_forward_matches_reference(case, dtype_name: str) -> None:  # noqa: ANN001
    inputs = make_inputs(case, DTYPES[dtype_name])
    out = fused_moe(*_cuda(*inputs), config=case.tile)
    assert out.is_cuda and out.dtype == inputs[0].dtype
    assert_close_scaled(out.cpu(), fused_moe_reference(*inputs), FWD_TOL[dtype_name])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_backward_matches_reference(case, dtype_name: str) -> None:  # noqa: ANN001
    inputs = make_inputs(case, DTYPES[dtype_name])
    dout = torch.randn(case.T, case.D, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype_name])
    got = _grads(lambda *a: fused_moe(*a, config=case.tile), _cuda(*inputs), dout.to(CUDA))
    want = _grads(fused_moe_reference, inputs, dout)
    for name, g, w in zip(("hidden", "gate_up", "down", "weights"), got, want):
        assert g.is_cuda and g.dtype == w.dtype, name
        assert_close_scaled(g.cpu(), w, BWD_TOL[dtype_name])


@pytest.mark.parametrize("T", [1, 16, 128, 512])
def test_gpu_autotuned_shapes_match_reference(T: int) -> None:
    """Engine-sized shapes with the tuned (not the test's small) tiles, in bf16 as served."""
    gen = torch.Generator().manual_seed(T)
    D, I, S, K = 1024, 2304, 8, 2
    hidden = torch.randn(T, D, generator=gen).bfloat16()
    gate_up = (torch.randn(S, 2 * I, D, generator=gen) * D**-0.5).bfloat16()
    down = (torch.randn(S, D, I, generator=gen) * I**-0.5).bfloat16()
    weights = torch.rand(T, K, generator=gen).softmax(-1)
    ids = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(T)])
    out = fused_moe(*_cuda(hidden, gate_up, down, weights, ids))
    assert_close_scaled(out.cpu(), fused_moe_reference(hidden, gate_up, down, weights, ids), FWD_TOL["bf16"])


@pytest.mark.parametrize("T, E, K, why", SOFTMAX_CASES)
def test_gpu_topk_softmax_matches_reference(T: int, E: int, K: int, why: str) -> None:
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E))
    w, ids = topk_softmax(logits.to(CUDA), K, True)
    w_ref, ids_ref = topk_softmax_reference(logits, K, True)
    assert torch.equal(ids.cpu(), ids_ref), why
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T, E, K, G, TG, why", GROUPED_CASES)
def test_gpu_grouped_topk_sigmoid_matches_reference(T: int, E: int, K: int, G: int, TG: int, why: str) -> None:
    gen = torch.Generator().manual_seed(E + T)
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.5
    got = grouped_topk_sigmoid(logits.to(CUDA), bias.to(CUDA), K, G, TG, True, 2.5)
    want = grouped_topk_sigmoid_reference(logits, bias, K, G, TG, True, 2.5)
    assert torch.equal(got[1].cpu(), want[1]), why
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, T, K, S, block_m, why", SORT_CASES)
def test_gpu_sort_pairs_matches_reference(kind: str, T: int, K: int, S: int, block_m: int, why: str) -> None:
    ids = sort_ids(kind, T, K, S)
    got, want = sort_pairs(ids.to(CUDA), S, block_m), sort_pairs_reference(ids, S, block_m)
    for a, b in zip(got.tensors(), want.tensors()):
        assert torch.equal(a.cpu(), b), why


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_engine_on_gpu_equals_transformers_on_gpu(store: str) -> None:
    """The shipped model with a 25% slot pool on the GPU: greedy tokens equal transformers' on the GPU."""
    from transformers import AutoModelForCausalLM

    import moeflow

    prompt, n = "def ", 24
    with moeflow.load(moeflow.engine.DEFAULT_MODEL, expert_budget="25%", store=store, device="cuda") as engine:
        assert engine.cache.pool.gate_up_S2ID.is_cuda
        ids = engine.encode(prompt)
        got = engine.generate(prompt, max_new_tokens=n).token_ids
        stats = engine.stats()
    model = AutoModelForCausalLM.from_pretrained(moeflow.engine.DEFAULT_MODEL, dtype=torch.float32).to(CUDA).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=CUDA), max_new_tokens=n, do_sample=False)
    assert got == out[0, len(ids) :].tolist()
    assert stats.misses > 0 and stats.resident_peak_bytes <= stats.budget_bytes
