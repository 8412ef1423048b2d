"""The fused MoE on the CPU, in torch: several formulations and GEMM backends, and the measured fastest.

Shape legend: T tokens, D hidden, I expert hidden, K experts per token, S slots in the weight pool,
P = T*K (token, k) pairs, V pairs with a real slot, n rows served by one slot.

Every formulation does what transformers' ``grouped_mm`` experts do, in the weights' dtype: gate/up
GEMM, ``silu(gate) * up``, down GEMM, times the routing weight (promoting to its dtype), then
``y.view(T, K, D).sum(1)``, the K weighted outputs of a token summed in k order. Slot ids outside
[0, S) are sentinels: the pair contributes exactly zero.

GEMM backends (fp32; other dtypes always use ``torch.mm``, which already goes to oneDNN for bf16):

- ``"mm"``: ``torch.mm``, MKL sgemm in torch's CPU build, the GEMM library transformers' experts use
  (measured: mostly bit-identical to its grouped_mm experts, else ~1e-7 relative).
- ``"onednn"``: oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU
  backend emits) on the same plain weight tensors, no copy kept. On this project's AMD EPYC it runs
  2-4x faster than MKL sgemm for these shapes (MKL takes a generic path on non-Intel CPUs); its
  summation order differs, so results differ from transformers by ~1e-7 relative (tested <= 1e-6).

``bench/moe_block.py`` measures every formulation x backend against transformers; the defaults below
are what won there (bench/results/moe_block.json).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_nIn, w_OutxIn) -> x @ w.T


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, w.t())


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        return torch.mm(x, w.t())
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


GEMMS: dict[str, Gemm] = {"mm": _mm}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    GEMMS["onednn"] = _onednn

# Measured defaults (bench/moe_block.py, 2-core AMD EPYC, fp32): oneDNN beats MKL at every T and E;
# up to this many (token, k) pairs, looping over pairs beats sorting by slot.
DEFAULT_GEMM = "onednn" if "onednn" in GEMMS else "mm"
PAIR_LOOP_MAX_PAIRS = 8


def _expert_mlp(x_nD: torch.Tensor, gate_up_2IxD: torch.Tensor, down_DxI: torch.Tensor, gemm: Gemm) -> torch.Tensor:
    h_n2I = gemm(x_nD, gate_up_2IxD)
    I = down_DxI.shape[1]
    return gemm(F.silu(h_n2I[:, :I]).mul_(h_n2I[:, I:]), down_DxI)


def _weight_and_sum(y_PD: torch.Tensor, weights_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    T, K = weights_TK.shape
    w_P1 = weights_TK.reshape(-1, 1)
    y_PD = y_PD.mul_(w_P1) if w_P1.dtype == y_PD.dtype else y_PD * w_P1
    return y_PD.view(T, K, -1).sum(dim=1).to(out_dtype)


def _sorted_by_slot(ids_TK: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, list[int]]:
    """Pairs with a real slot, ordered by slot (stable), and the number of pairs per slot."""
    ids_P = ids_TK.reshape(-1)
    key_P = torch.where((ids_P >= 0) & (ids_P < num_slots), ids_P, num_slots)  # sentinels sort last
    order_P = torch.sort(key_P, stable=True).indices
    # One host sync: the per-slot row counts drive the Python loop over slots.
    counts = torch.bincount(key_P, minlength=num_slots + 1)[:num_slots].tolist()
    return order_P[: sum(counts)], counts


def moe_sorted(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gemm: str = DEFAULT_GEMM,
) -> torch.Tensor:
    """Sort pairs by slot, gather their rows once, one gate/up and one down GEMM per used slot."""
    T, D = hidden_TD.shape
    K = ids_TK.shape[1]
    order_V, counts = _sorted_by_slot(ids_TK, gate_up_SxI2xD.shape[0])
    x_VD = hidden_TD.index_select(0, order_V // K)
    outs, start = [], 0
    for s, n in enumerate(counts):
        if n:
            outs.append(_expert_mlp(x_VD[start : start + n], gate_up_SxI2xD[s], down_SxDxI[s], GEMMS[gemm]))
            start += n
    y_PD = hidden_TD.new_zeros(T * K, D)
    if outs:
        y_PD[order_V] = torch.cat(outs)
    return _weight_and_sum(y_PD, weights_TK, hidden_TD.dtype)


def moe_pair_loop(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gemm: str = DEFAULT_GEMM,
) -> torch.Tensor:
    """One (token, k) pair at a time: no sort, no gather; for decode-sized batches."""
    T, D = hidden_TD.shape
    S, K = gate_up_SxI2xD.shape[0], ids_TK.shape[1]
    y_PD = hidden_TD.new_zeros(T * K, D)
    # One host sync: the slot ids pick the weight matrices.
    for p, s in enumerate(ids_TK.reshape(-1).tolist()):
        if 0 <= s < S:
            t = p // K
            y_PD[p] = _expert_mlp(hidden_TD[t : t + 1], gate_up_SxI2xD[s], down_SxDxI[s], GEMMS[gemm])[0]
    return _weight_and_sum(y_PD, weights_TK, hidden_TD.dtype)


def moe_sorted_autograd(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """``moe_sorted`` out of place with ``torch.mm``, so autograd can differentiate it (CPU training)."""
    T, D = hidden_TD.shape
    I, K = down_SxDxI.shape[2], ids_TK.shape[1]
    order_V, counts = _sorted_by_slot(ids_TK, gate_up_SxI2xD.shape[0])
    x_VD = hidden_TD.index_select(0, order_V // K)
    outs, start = [], 0
    for s, n in enumerate(counts):
        if n:
            h = x_VD[start : start + n] @ gate_up_SxI2xD[s].t()
            outs.append((F.silu(h[:, :I]) * h[:, I:]) @ down_SxDxI[s].t())
            start += n
    y_VD = torch.cat(outs) if outs else hidden_TD.new_zeros(0, D)
    y_VD = y_VD * weights_TK.reshape(-1)[order_V][:, None]
    y_PD = y_VD.new_zeros(T * K, D).index_copy(0, order_V, y_VD)
    return y_PD.view(T, K, D).sum(dim=1).to(hidden_TD.dtype)


# Every inference formulation x backend, by name, for the tests and the benchmark.
CPU_FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    f"{name}[{gemm}]": (lambda *a, _f=fn, _g=gemm: _f(*a, gemm=_g))
    for name, fn in (("sorted", moe_sorted), ("pair_loop", moe_pair_loop))
    for gemm in GEMMS
}


def fused_moe_cpu(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gemm: str | None = None,
) -> torch.Tensor:
    """The CPU path of ``kernels.fused_moe`` (arguments already checked). ``gemm``: a key of
    ``GEMMS``, default ``DEFAULT_GEMM``; ``"mm"`` uses the GEMM library transformers uses."""
    args = (hidden_TD, gate_up_SxI2xD, down_SxDxI, weights_TK, ids_TK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
        return moe_sorted_autograd(*args)
    gemm = gemm or DEFAULT_GEMM
    if gemm not in GEMMS:
        raise ValueError(f"cpu gemm {gemm!r} is not one of {sorted(GEMMS)}")
    if ids_TK.numel() <= PAIR_LOOP_MAX_PAIRS:
        return moe_pair_loop(*args, gemm=gemm)
    return moe_sorted(*args, gemm=gemm)
