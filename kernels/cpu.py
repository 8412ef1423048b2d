"""The fused MoE on the CPU, in torch: several formulations, and the one measured fastest.

Shape legend: T tokens, D hidden, I expert hidden, K experts per token, S slots in the weight pool,
P = T*K (token, k) pairs, n rows served by one slot.

Every formulation computes, in the weights' dtype like transformers' ``grouped_mm`` experts:
gate/up GEMM, ``silu(gate) * up``, down GEMM, times the routing weight (promoting to its dtype),
then ``y.view(T, K, D).sum(1)``: the K weighted outputs of a token summed in k order, as
transformers does, so fp32 results match it to rounding noise. Slot ids outside [0, S) are
sentinels: the pair contributes zero.

``bench/moe_block.py`` measures them against transformers; ``fused_moe_cpu`` dispatches by the
measured crossover (see ``PAIR_LOOP_MAX_PAIRS``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Up to this many (token, k) pairs, looping over pairs (no sort, no gather) beat sorting by slot:
# bench/moe_block.py, 2-core CPU, fp32, see bench/results/.
PAIR_LOOP_MAX_PAIRS = 8


def _sorted_by_slot(ids_TK: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, list[int]]:
    """Pairs ordered by slot (stable; sentinels last) and the number of real pairs per slot."""
    ids_P = ids_TK.reshape(-1)
    valid_P = (ids_P >= 0) & (ids_P < num_slots)
    key_P = torch.where(valid_P, ids_P, num_slots)
    order_P = torch.sort(key_P, stable=True).indices
    # One host sync: the per-slot row counts drive the Python loop over slots.
    counts = torch.bincount(key_P, minlength=num_slots + 1)[:num_slots].tolist()
    return order_P, counts


def moe_sorted(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """Sort pairs by slot; per slot, one GEMM into a preallocated [n, 2I] slice, SiLU and mul in
    place on its gate half, one GEMM into the [n, D] output slice; weight, unpermute, sum over k.
    No autograd (in-place and ``out=``)."""
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_SxI2xD.shape
    I, K = I2 // 2, ids_TK.shape[1]
    order_P, counts = _sorted_by_slot(ids_TK, S)
    n_valid = sum(counts)
    order_V = order_P[:n_valid]
    x_VD = hidden_TD.index_select(0, order_V // K)
    h_V2I = torch.empty(n_valid, I2, dtype=hidden_TD.dtype)
    y_VD = torch.empty(n_valid, D, dtype=hidden_TD.dtype)
    start = 0
    for s, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            h = torch.mm(x_VD[rows], gate_up_SxI2xD[s].t(), out=h_V2I[rows])
            g = F.silu(h[:, :I], inplace=True).mul_(h[:, I:])
            torch.mm(g, down_SxDxI[s].t(), out=y_VD[rows])
            start += n
    w_V = weights_TK.reshape(-1)[order_V]
    y_VD = y_VD.mul_(w_V[:, None]) if w_V.dtype == y_VD.dtype else y_VD * w_V[:, None]
    y_PD = y_VD.new_zeros(T * K, D)
    y_PD.index_copy_(0, order_V, y_VD)
    return y_PD.view(T, K, D).sum(dim=1).to(hidden_TD.dtype)


def moe_pair_loop(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """One (token, k) pair at a time: no sort, no gather; for decode-sized batches."""
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_SxI2xD.shape
    I, K = I2 // 2, ids_TK.shape[1]
    y_PD = hidden_TD.new_zeros(T * K, D)
    # One host sync: the slot ids pick the weight matrices.
    for p, s in enumerate(ids_TK.reshape(-1).tolist()):
        if 0 <= s < S:
            h = torch.mm(hidden_TD[p // K : p // K + 1], gate_up_SxI2xD[s].t())
            g = F.silu(h[:, :I], inplace=True).mul_(h[:, I:])
            torch.mm(g, down_SxDxI[s].t(), out=y_PD[p : p + 1])
    w_P = weights_TK.reshape(-1)
    y_PD = y_PD.mul_(w_P[:, None]) if w_P.dtype == y_PD.dtype else y_PD * w_P[:, None]
    return y_PD.view(T, K, D).sum(dim=1).to(hidden_TD.dtype)


def moe_sorted_autograd(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """``moe_sorted`` written out of place, so autograd can differentiate it (training on the CPU)."""
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_SxI2xD.shape
    I, K = I2 // 2, ids_TK.shape[1]
    order_P, counts = _sorted_by_slot(ids_TK, S)
    n_valid = sum(counts)
    order_V = order_P[:n_valid]
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


CPU_FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sorted": moe_sorted,
    "pair_loop": moe_pair_loop,
    "sorted_autograd": moe_sorted_autograd,
}


def fused_moe_cpu(
    hidden_TD: torch.Tensor,
    gate_up_SxI2xD: torch.Tensor,
    down_SxDxI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """The CPU path of ``kernels.fused_moe`` (arguments already checked)."""
    args = (hidden_TD, gate_up_SxI2xD, down_SxDxI, weights_TK, ids_TK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
        return moe_sorted_autograd(*args)
    if ids_TK.numel() <= PAIR_LOOP_MAX_PAIRS:
        return moe_pair_loop(*args)
    return moe_sorted(*args)
