"""Routers: which K experts each token goes to, and with what weight.

Shape legend: T tokens, E experts, K experts per token (top-k), G expert groups.

Two routers, each as a torch reference, a Triton kernel, a checked launcher and a custom op:

- ``topk_softmax`` (Mixtral, Qwen2/3-MoE, OLMoE): softmax over all E logits in fp32, the K largest
  probabilities, optionally renormalised to sum to one.
- ``grouped_topk_sigmoid`` (DeepSeek-V3): sigmoid scores; the *choice* adds
  ``e_score_correction_bias``; experts are split into G groups, a group scores the sum of its two
  best choices, only the ``topk_group`` best groups stay eligible; the K best eligible experts by
  choice are picked, weighted by their *unbiased* sigmoid scores, optionally renormalised
  (``+1e-20`` as transformers does) and multiplied by ``routed_scaling_factor``.

Both return ``(weights_TK fp32, ids_TK int64)`` with the K experts in descending order of the
selection score; ties go to the lower expert id.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeflow.kernels.backend import use_triton

# --------------------------------------------------------------------------------------------------
# torch references (also the CPU path)
# --------------------------------------------------------------------------------------------------


def topk_softmax_reference(
    router_logits_TE: torch.Tensor, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32, top-k, optional renormalisation: transformers' ``MixtralTopKRouter`` maths."""
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def grouped_topk_sigmoid_reference(
    router_logits_TE: torch.Tensor,
    e_score_correction_bias_E: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing, step by step as in transformers' ``DeepseekV3TopkRouter``."""
    T, E = router_logits_TE.shape
    scores_TE = router_logits_TE.float().sigmoid()
    choice_TE = scores_TE + e_score_correction_bias_E.float()
    group_scores_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_scores_TG, k=topk_group, dim=-1)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_ids, 1.0)
    expert_mask_TE = group_mask_TG.repeat_interleave(E // n_group, dim=1).bool()
    choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    ids_TK = torch.topk(choice_TE, k=k, dim=-1)[1]
    weights_TK = scores_TE.gather(1, ids_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * routed_scaling_factor, ids_TK


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _pick_topk(sel, vals, cols, K: tl.constexpr, K_PAD: tl.constexpr):
    """K rounds of (row max of ``sel``, lowest column holding it, knock it out).

    ``sel`` and ``vals`` are [BLOCK_T, BLOCK_E] fp32; ``sel`` holds -inf where a column may not be
    picked (a row needs at least K finite entries). Returns the picked columns [BLOCK_T, K_PAD] int32
    and ``vals`` at those columns [BLOCK_T, K_PAD] fp32; entries at k >= K are unused.
    """
    kcols = tl.arange(0, K_PAD)
    picked = tl.zeros((sel.shape[0], K_PAD), dtype=tl.int32)
    picked_vals = tl.zeros((sel.shape[0], K_PAD), dtype=tl.float32)
    for kk in tl.static_range(K):
        best = tl.max(sel, axis=1)
        idx = tl.min(tl.where(sel == best[:, None], cols[None, :], sel.shape[1]), axis=1)
        hit = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(hit, vals, 0.0), axis=1)
        picked = tl.where(kcols[None, :] == kk, idx[:, None], picked)
        picked_vals = tl.where(kcols[None, :] == kk, val[:, None], picked_vals)
        sel = tl.where(hit, float("-inf"), sel)
    return picked, picked_vals


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,  # [T, E] any float dtype
    weights_ptr,  # [T, K] fp32, written
    ids_ptr,  # [T, K] int64, written
    T,
    E,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program routes BLOCK_T tokens; BLOCK_E >= E (a whole row of logits is in registers)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    num = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = num / tl.sum(num, axis=1)[:, None]
    sel = tl.where(col_ok[None, :], probs, float("-inf"))
    picked, weights = _pick_topk(sel, probs, cols, K, K_PAD)
    kcols = tl.arange(0, K_PAD)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + out_off, weights, mask=out_mask)
    tl.store(ids_ptr + out_off, picked.to(tl.int64), mask=out_mask)


@triton.jit
def _grouped_topk_sigmoid_kernel(
    logits_ptr,  # [T, E] any float dtype
    bias_ptr,  # [E] any float dtype
    weights_ptr,  # [T, K] fp32, written
    ids_ptr,  # [T, K] int64, written
    T,
    E,
    stride_lt,
    stride_le,
    scaling,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    N_GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program routes BLOCK_T tokens. Groups are contiguous runs of E // N_GROUP experts; neither
    E nor the group size needs to be a power of two (groups are found by index, not by reshape)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    choice = tl.where(col_ok[None, :], scores + bias[None, :], float("-inf"))

    group_of_col = cols // (E // N_GROUP)
    gcols = tl.arange(0, G_PAD)
    group_scores = tl.full((BLOCK_T, G_PAD), float("-inf"), dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        in_group = group_of_col[None, :] == g
        c = tl.where(in_group, choice, float("-inf"))
        first = tl.max(c, axis=1)
        first_col = tl.min(tl.where(c == first[:, None], cols[None, :], BLOCK_E), axis=1)
        second = tl.max(tl.where(cols[None, :] == first_col[:, None], float("-inf"), c), axis=1)
        group_scores = tl.where(gcols[None, :] == g, (first + second)[:, None], group_scores)
    kept_groups, _ = _pick_topk(group_scores, group_scores, gcols, TOPK_GROUP, G_PAD)  # [BLOCK_T, G_PAD]
    keep_col = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for j in tl.static_range(TOPK_GROUP):
        gj = tl.sum(tl.where(gcols[None, :] == j, kept_groups, 0), axis=1)
        keep_col = keep_col | (group_of_col[None, :] == gj[:, None])

    sel = tl.where(keep_col & col_ok[None, :], choice, float("-inf"))
    picked, weights = _pick_topk(sel, scores, cols, K, K_PAD)
    kcols = tl.arange(0, K_PAD)
    if NORMALIZE:
        real = tl.where(kcols[None, :] < K, weights, 0.0)
        weights = weights / (tl.sum(real, axis=1)[:, None] + 1e-20)
    weights = weights * scaling
    out_off = rows[:, None].to(tl.int64) * K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + out_off, weights, mask=out_mask)
    tl.store(ids_ptr + out_off, picked.to(tl.int64), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# launchers: check shapes, build the grid
# --------------------------------------------------------------------------------------------------


def _block_t(block_e: int) -> int:
    # A program holds a few [BLOCK_T, BLOCK_E] fp32 tiles; keep each around 4K elements.
    return max(1, min(16, 4096 // block_e))


def _check_logits(router_logits_TE: torch.Tensor, k: int) -> None:
    if router_logits_TE.dim() != 2:
        raise ValueError(f"router_logits_TE must be [T, E], got shape {tuple(router_logits_TE.shape)}")
    if not 1 <= k <= router_logits_TE.shape[1]:
        raise ValueError(f"k must be in [1, E={router_logits_TE.shape[1]}], got {k}")


def _check_grouped(
    router_logits_TE: torch.Tensor, e_score_correction_bias_E: torch.Tensor, k: int, n_group: int, topk_group: int
) -> None:
    _check_logits(router_logits_TE, k)
    E = router_logits_TE.shape[1]
    if e_score_correction_bias_E.shape != (E,):
        raise ValueError(f"e_score_correction_bias must be [E={E}], got {tuple(e_score_correction_bias_E.shape)}")
    if n_group < 1 or E % n_group or E // n_group < 2:
        raise ValueError(f"E={E} must split into n_group={n_group} equal groups of at least 2 experts")
    if not 1 <= topk_group <= n_group or k > topk_group * (E // n_group):
        raise ValueError(
            f"topk_group={topk_group} groups of {E // n_group} experts cannot supply k={k} experts "
            f"(need 1 <= topk_group <= n_group={n_group})"
        )


def launch_topk_softmax(router_logits_TE: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_logits(router_logits_TE, k)
    T, E = router_logits_TE.shape
    weights_TK = torch.empty(T, k, device=router_logits_TE.device, dtype=torch.float32)
    ids_TK = torch.empty(T, k, device=router_logits_TE.device, dtype=torch.int64)
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(block_e)
    if T == 0:
        return weights_TK, ids_TK
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        router_logits_TE, weights_TK, ids_TK, T, E,
        router_logits_TE.stride(0), router_logits_TE.stride(1),
        K=k, K_PAD=triton.next_power_of_2(k), RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return weights_TK, ids_TK


def launch_grouped_topk_sigmoid(
    router_logits_TE: torch.Tensor,
    e_score_correction_bias_E: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_grouped(router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group)
    T, E = router_logits_TE.shape
    weights_TK = torch.empty(T, k, device=router_logits_TE.device, dtype=torch.float32)
    ids_TK = torch.empty(T, k, device=router_logits_TE.device, dtype=torch.int64)
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(block_e)
    if T == 0:
        return weights_TK, ids_TK
    _grouped_topk_sigmoid_kernel[(triton.cdiv(T, block_t),)](
        router_logits_TE, e_score_correction_bias_E, weights_TK, ids_TK, T, E,
        router_logits_TE.stride(0), router_logits_TE.stride(1), float(routed_scaling_factor),
        K=k, K_PAD=triton.next_power_of_2(k), N_GROUP=n_group, G_PAD=triton.next_power_of_2(n_group),
        TOPK_GROUP=topk_group, NORMALIZE=norm_topk_prob, BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return weights_TK, ids_TK


# --------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("moeflow::topk_softmax", mutates_args=())
def _topk_softmax_op(router_logits_TE: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_topk_softmax(router_logits_TE, k, renormalize)


@_topk_softmax_op.register_fake
def _(router_logits_TE: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = router_logits_TE.shape[0]
    dev = router_logits_TE.device
    return torch.empty(T, k, device=dev, dtype=torch.float32), torch.empty(T, k, device=dev, dtype=torch.int64)


@torch.library.custom_op("moeflow::grouped_topk_sigmoid", mutates_args=())
def _grouped_topk_sigmoid_op(
    router_logits_TE: torch.Tensor,
    e_score_correction_bias_E: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_grouped_topk_sigmoid(
        router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor
    )


@_grouped_topk_sigmoid_op.register_fake
def _(
    router_logits_TE: torch.Tensor,
    e_score_correction_bias_E: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T = router_logits_TE.shape[0]
    dev = router_logits_TE.device
    return torch.empty(T, k, device=dev, dtype=torch.float32), torch.empty(T, k, device=dev, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def topk_softmax(router_logits_TE: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax routing -> ``(weights_TK fp32, ids_TK int64)``.

    ``renormalize=True`` is Mixtral (and Qwen with ``norm_topk_prob``): the K weights sum to one.
    Triton on a GPU or under ``TRITON_INTERPRET=1``, the torch reference otherwise.
    """
    if use_triton(router_logits_TE):
        return _topk_softmax_op(router_logits_TE, k, renormalize)
    _check_logits(router_logits_TE, k)
    return topk_softmax_reference(router_logits_TE, k, renormalize)


def grouped_topk_sigmoid(
    router_logits_TE: torch.Tensor,
    e_score_correction_bias_E: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 grouped sigmoid routing with a selection bias -> ``(weights_TK fp32, ids_TK int64)``.

    Same arguments as the fields of ``DeepseekV3Config`` (``n_group``, ``topk_group``,
    ``norm_topk_prob``, ``routed_scaling_factor``) and the router's ``e_score_correction_bias``.
    """
    if use_triton(router_logits_TE, e_score_correction_bias_E):
        return _grouped_topk_sigmoid_op(
            router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group, norm_topk_prob,
            routed_scaling_factor,
        )  # fmt: skip
    _check_grouped(router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group)
    return grouped_topk_sigmoid_reference(
        router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor
    )
