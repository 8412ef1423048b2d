"""``experts_forward``: the one expert-MLP entry of moeflow, called by the offload engine and by training.

Shape letters: the legend in ``moeflow/__init__.py`` (T tokens, D hidden, I expert intermediate, S slots
of the weight pool, K experts per token). For pair (t, k) served by slot s = slot_ids[t, k]:

    out[t] = sum over k, in k order, of  weights[t, k] * down[s] @ gate(gate_up[s] @ x[t])

where ``gate`` maps the [2I] gate/up product to [I] (transformers' ``_apply_gate`` of the family; None is
SiLU(gate half) * up half). A pair whose slot is -1 (any id outside [0, S)) contributes 0: the engine
runs a layer's experts in waves that each fit the slot pool.

``exact=True``: the arithmetic of transformers' grouped_mm experts, so the result equals theirs to the
last bit on the CPU (tests/kernels/test_kernels_experts.py runs transformers itself): pairs sorted by
slot with ``torch.sort`` as transformers sorts them, one ``F.grouped_mm`` per projection with the gate
between, the routing weight, original order, the sum over k. Two CPU cases take a loop with the same
arithmetic (``kernels.cpu``'s formulations with ``torch.mm``): one token (below), and weights that
``grouped_mm`` cannot take (``backend.grouped_mm_fits``), where the loop runs what grouped_mm runs on the
CPU, one ``torch.mm`` per slot.

``exact=False``: ``kernels.fused_moe``, the fastest measured path: the Triton kernels on a GPU (kernel,
launcher, custom op and autograd.Function layers in ``kernels/fused_moe.py``), the formulation
``kernels.cpu.cpu_plan`` picks on the CPU (oneDNN sums in another order: ~1e-6 relative from
transformers in fp32). The Triton kernels fuse SiLU-and-mul, so a family's own ``gate`` takes the exact
path.

Both paths are differentiable: autograd through torch ops, or the Triton path's own backward.
"""

from __future__ import annotations

import torch
from moeflow.kernels import backend
from moeflow.kernels.cpu import (
    GEMMS,
    Gate,
    _weight_and_sum,
    expert_hidden,
    expert_output,
    moe_grouped_mm,
    moe_pair_loop,
    moe_sorted,
    planned_moe,
    silu_and_mul,
)
from moeflow.kernels.fused_moe import check_moe_args, fused_moe


def experts_forward(
    x_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor,
    slot_ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact: bool = True,
) -> torch.Tensor:
    """The routed experts' output [T, D] in x's dtype (see the module docstring for the arithmetic).

    ``gate_up_S2ID [S, 2I, D]`` (gate rows, then up rows) and ``down_SDI [S, D, I]`` share x's dtype and
    may be views into a bigger pool; ``weights_TK`` is any float dtype (the products promote to it, as
    in transformers); ``slot_ids_TK`` int32/int64, -1 for a pair computed elsewhere. ``biases``: per slot
    (gate_up bias [S, 2I], down bias [S, D]) for families whose experts have biases (gpt-oss), added after
    each GEMM as transformers adds them; they take the exact path. ValueError for shapes, dtypes or
    devices that disagree.
    """
    if not exact and gate is None and biases is None:
        return fused_moe(x_TD, gate_up_S2ID, down_SDI, weights_TK, slot_ids_TK)  # checks its arguments
    return _exact(x_TD, gate_up_S2ID, down_SDI, weights_TK, slot_ids_TK, gate, biases)


def experts_rows(
    x_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    slot_ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact: bool = True,
) -> torch.Tensor:
    """Each pair's expert output before its routing weight, ``[T * K, D]`` (row t * K + k), zeros for pairs whose
    slot is -1: the exact path's rows, so the exact ``experts_forward`` is ``weighted_sum`` of them. A layer
    whose experts arrive in batches computes each batch's pairs as it lands and sums once at the end: every
    pair's row is the same whichever other slots a call serves (each slot's rows go through one GEMM either way).
    ``exact=False`` (CPU tensors): the rows of ``kernels.cpu.cpu_plan``'s formulation, within fp32 rounding."""
    if not exact and x_TD.device.type == "cpu":
        check_moe_args(x_TD, gate_up_S2ID, down_SDI, None, slot_ids_TK)
        return planned_moe(x_TD, gate_up_S2ID, down_SDI, None, slot_ids_TK, gate=gate, biases=biases)
    return _exact(x_TD, gate_up_S2ID, down_SDI, None, slot_ids_TK, gate, biases)


def pair_hidden(x_1D: torch.Tensor, gate_up_2ID: torch.Tensor, *, gate: Gate | None = None) -> torch.Tensor:
    """The first half of one (token, expert) pair's row on the exact path, for one token on the CPU: the gate/up
    product through the gate, [1, I]. ``pair_row(pair_hidden(x, gate_up[s]), down[s])`` is that pair's row of
    ``experts_rows`` bit for bit (the same two ``torch.mm`` and the gate), so a layer can compute the first half
    as soon as an expert's gate/up matrices are in, while its down matrix is still being read. No biases."""
    return expert_hidden(x_1D, gate_up_2ID, GEMMS["mm"], gate or silu_and_mul)


def pair_row(h_1I: torch.Tensor, down_DI: torch.Tensor) -> torch.Tensor:
    """The second half of `pair_hidden`: the pair's row before its routing weight, [1, D]."""
    return expert_output(h_1I, down_DI, GEMMS["mm"])


def weighted_sum(rows_PD: torch.Tensor, weights_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``experts_forward``'s output from the pairs' rows (``experts_rows``): the sum over k, in k order, of the
    routing weight times the row, in ``out_dtype``. Scales ``rows_PD`` in place where the dtypes agree."""
    return _weight_and_sum(rows_PD, weights_TK, out_dtype)


def _exact(
    x_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor | None,
    slot_ids_TK: torch.Tensor,
    gate: Gate | None,
    biases: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    check_moe_args(x_TD, gate_up_S2ID, down_SDI, weights_TK, slot_ids_TK)
    args = (x_TD, gate_up_S2ID, down_SDI, weights_TK, slot_ids_TK)
    if x_TD.shape[0] == 1 and x_TD.device.type == "cpu":
        # Decoding one sequence: a token's K experts differ, so every group is one row, and grouped_mm
        # runs one torch.mm per group; calling torch.mm per pair is the same arithmetic without the
        # sort (bit-identical in fp32/bf16/fp16; bench/moe_block.py: 0.09 vs 0.23 ms at the default model).
        return moe_pair_loop(*args, gemm="mm", gate=gate, biases=biases)
    if backend.grouped_mm_fits(gate_up_S2ID, down_SDI):
        return moe_grouped_mm(*args, gate=gate, biases=biases)
    return moe_sorted(*args, gemm="mm", gate=gate, biases=biases)
