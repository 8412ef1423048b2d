"""Fused MoE expert MLP: Triton kernels, launchers, custom ops, autograd, and the public entry point.

Shape legend: T tokens, D hidden, I expert hidden, K experts per token, S slots in the weight pool
(the experts' first dimension), P = T*K (token, k) pairs, NP padded pair positions (sorted by slot,
see ``kernels.metadata``), NB = NP / BLOCK_M blocks, NBN column blocks.

Forward, for pair p = t*K + k served by slot s = ids[t, k] with routing weight w = weights[t, k]:

    g, u   = W_gu[s, :I] @ x[t],  W_gu[s, I:] @ x[t]      _gate_up_kernel  (gather x rows by index)
    a      = silu(g) * u                                   (its epilogue; a is stored by sorted position)
    y[p]   = w * (W_d[s] @ a)                              _rows_gemm_kernel (weight in the epilogue,
                                                            stored by pair, in fp32)
    out[t] = y[t*K] + y[t*K+1] + ... + y[t*K+K-1]          _sum_topk_kernel  (k order, no atomics)

The weights are read straight from the pool with the slot ids: no expert is copied. Pairs whose id
is outside [0, S) are sentinels: never computed, and the reduction treats them as zero.

Backward (``FusedMoEFunction``), with dout [T, D]:

    c      = W_d[s]^T @ dout[t]                            _down_bwd_kernel: c . a = dL/dw,
    da     = w * c;  dg, du = silu/mul backward of da       dg, du stored by sorted position
    dx[p]  = W_gu[s]^T @ [dg; du]                          _rows_gemm_kernel, then _sum_topk_kernel
    dW_gu[s] = sum_p [dg; du] x[t]^T                        _slot_wgrad_kernel (one program per slot
    dW_d[s]  = sum_p (w dout[t]) a^T                         and tile, loops over the slot's rows)

Every accumulation is fp32. bf16/fp16 operands are loaded as they are; under the interpreter bf16
operands are cast to fp32 inside the kernel before ``tl.dot`` (the interpreter's bf16 dot is wrong).
fp32 dots use IEEE precision (no TF32), so fp32 results stay close to torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeflow.kernels.backend import INTERPRETING, use_triton
from moeflow.kernels.config import TileConfig, get_config
from moeflow.kernels.cpu import fused_moe_cpu
from moeflow.kernels.metadata import SortedPairs, launch_sort_pairs

_SUM_BLOCK_T = 16
_SUM_BLOCK_N = 128

# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation; UPCAST casts bf16 operands to fp32 first."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D] activations
    w_ptr,  # [S, 2I, D] gate rows then up rows, per slot
    act_ptr,  # [NP, I] written: silu(g) * u, by sorted position, in the activation dtype
    preact_ptr,  # [NP, 2I] written when SAVE_PREACT: g then u (for backward)
    sorted_ptr,  # [NP] int32 pair id per position (P = padding)
    block_slot_ptr,  # [NB] int32 slot per block
    num_padded_ptr,  # [1] int32
    P,
    D,
    I,
    TOP_K,
    stride_xt,
    stride_xd,
    stride_ws,
    stride_wn,
    stride_wd,
    stride_am,
    stride_an,
    stride_pm,
    stride_pn,
    SAVE_PREACT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (NB, cdiv(I, BLOCK_N)). A program computes a [BLOCK_M, BLOCK_N] tile of both the gate and
    the up projection for one block of same-slot pairs, gathering x rows by token index.

    Every position is written: padding rows, and whole blocks past num_padded (their K loop is empty),
    store silu(0) * 0 = 0, so the op's outputs are a pure function of its inputs (torch.compile)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_end = tl.where(pid_m * BLOCK_M < tl.load(num_padded_ptr), D, 0)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + pos)
    row_ok = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + kk[None, :] * stride_xd
    wg_ptrs = w_ptr + slot * stride_ws + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wd
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = kk < D - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = _dot(x, wg, acc_g, UPCAST, IEEE)
        acc_u = _dot(x, wu, acc_u, UPCAST, IEEE)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_mask = n_ok[None, :]  # all BLOCK_M rows: padding rows hold 0
    pos64 = pos.to(tl.int64)
    tl.store(
        act_ptr + pos64[:, None] * stride_am + n[None, :] * stride_an,
        act.to(act_ptr.dtype.element_ty),
        mask=out_mask,
    )
    if SAVE_PREACT:
        pre_ptrs = preact_ptr + pos64[:, None] * stride_pm + n[None, :] * stride_pn
        tl.store(pre_ptrs, acc_g.to(preact_ptr.dtype.element_ty), mask=out_mask)
        tl.store(pre_ptrs + I * stride_pn, acc_u.to(preact_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr,  # [NP, KD] rows by sorted position
    w_ptr,  # per slot a [KD, N] matrix, read through strides (no copy, no transpose)
    out_ptr,  # [P, N] fp32 written, rows by pair id
    topk_w_ptr,  # [P] routing weights (any float dtype), read when WEIGHTED
    sorted_ptr,  # [NP] int32
    block_slot_ptr,  # [NB] int32
    num_padded_ptr,  # [1] int32
    P,
    N,
    KD,
    stride_am,
    stride_ak,
    stride_ws,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    WEIGHTED: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (NB, cdiv(N, BLOCK_N)). out[pair] = (w[pair] *) a[pos] @ W[slot]: the down projection in
    the forward (routing weight in the epilogue), the input gradient in the backward."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    pos = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair = tl.load(sorted_ptr + pos)
    row_ok = pair < P
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pos[:, None] * stride_am + kk[None, :] * stride_ak
    w_ptrs = w_ptr + slot * stride_ws + kk[:, None].to(tl.int64) * stride_wk + n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k_ok = kk < KD - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, UPCAST, IEEE)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if WEIGHTED:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + n[None, :] * stride_on
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_topk_kernel(
    y_ptr,  # [P, N] fp32, rows by pair id; rows of sentinel pairs are never read
    ids_ptr,  # [P] slot per pair
    out_ptr,  # [T, N] written, in its own dtype
    T,
    N,
    S,
    stride_yp,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)). out[t] = sum over k, in k order, of y[t*K + k]
    (a sentinel pair adds exactly zero); each output element is written by one program."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < T
    n_ok = n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        p = t.to(tl.int64) * TOP_K + k
        slot = tl.load(ids_ptr + p, mask=t_ok, other=-1)
        ok = t_ok & (slot >= 0) & (slot < S)
        acc += tl.load(y_ptr + p[:, None] * stride_yp + n[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
    tl.store(
        out_ptr + t[:, None].to(tl.int64) * stride_ot + n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=t_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _down_bwd_kernel(
    dout_ptr,  # [T, D] upstream gradient
    w_ptr,  # [S, D, I] down weights
    preact_ptr,  # [NP, 2I] g then u, by position (saved by the forward)
    topk_w_ptr,  # [P] routing weights
    dpreact_ptr,  # [NP, 2I] written: dg then du, by position
    dw_part_ptr,  # [NBN, NP] fp32 written: this column block's share of dL/dw per position
    sorted_ptr,
    block_slot_ptr,
    num_padded_ptr,
    P,
    D,
    I,
    TOP_K,
    NP,
    stride_dt,
    stride_dd,
    stride_ws,
    stride_wd,
    stride_wi,
    stride_pm,
    stride_pn,
    stride_gm,
    stride_gn,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (NB, cdiv(I, BLOCK_N)). c = dout[t] @ W_d[s] (gathered rows, [BLOCK_M, BLOCK_N] of I),
    then the epilogue: partial c . a for dL/dw, and the SiLU-and-mul backward of da = w * c."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    pos = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair = tl.load(sorted_ptr + pos)
    row_ok = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    d_ptrs = dout_ptr + tok[:, None] * stride_dt + kk[None, :] * stride_dd
    w_ptrs = w_ptr + slot * stride_ws + kk[:, None].to(tl.int64) * stride_wd + n[None, :] * stride_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = kk < D - k0
        d = tl.load(d_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(d, w, acc, UPCAST, IEEE)
        d_ptrs += BLOCK_K * stride_dd
        w_ptrs += BLOCK_K * stride_wd
    mask = row_ok[:, None] & n_ok[None, :]
    pre_ptrs = preact_ptr + pos[:, None] * stride_pm + n[None, :] * stride_pn
    g = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre_ptrs + I * stride_pn, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(dw_part_ptr + pid_n * NP + pos, tl.sum(acc * silu * u, axis=1), mask=row_ok)
    da = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dg = da * u * (sig * (1.0 + g * (1.0 - sig)))
    du = da * silu
    g_ptrs = dpreact_ptr + pos[:, None] * stride_gm + n[None, :] * stride_gn
    tl.store(g_ptrs, dg.to(dpreact_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptrs + I * stride_gn, du.to(dpreact_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slot_wgrad_kernel(
    l_ptr,  # left rows [*, M_OUT]: by position, or by token when L_BY_TOKEN
    r_ptr,  # right rows [*, N_OUT]: by position, or by token when R_BY_TOKEN
    scale_ptr,  # [P] routing weights, multiply the left rows when SCALE_L
    dw_ptr,  # [S, M_OUT, N_OUT] written (every slot, zeros for a slot without pairs)
    sorted_ptr,
    slot_start_ptr,  # [S] int32
    slot_count_ptr,  # [S] int32
    M_OUT,
    N_OUT,
    TOP_K,
    stride_lr,
    stride_lc,
    stride_rr,
    stride_rc,
    stride_ds,
    stride_dm,
    stride_dn,
    L_BY_TOKEN: tl.constexpr,
    R_BY_TOKEN: tl.constexpr,
    SCALE_L: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (S, cdiv(M_OUT, BLOCK_M), cdiv(N_OUT, BLOCK_N)). dW[s] = sum over the slot's rows r of
    L[r]^T R[r], BLOCK_K rows at a time; a deterministic sum, with no atomics."""
    slot = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < M_OUT
    j_ok = j < N_OUT
    start = tl.load(slot_start_ptr + slot)
    count = tl.load(slot_count_ptr + slot)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        r_ok = rr < count
        pos = (start + rr).to(tl.int64)
        pair = tl.load(sorted_ptr + pos, mask=r_ok, other=0)
        tok = (pair // TOP_K).to(tl.int64)
        l_row = tok if L_BY_TOKEN else pos
        r_row = tok if R_BY_TOKEN else pos
        # Masked lanes feed tl.dot, so they must read as zero (other=0), not as whatever was there.
        l_mask = i_ok[:, None] & r_ok[None, :]
        left = tl.load(l_ptr + l_row[None, :] * stride_lr + i[:, None] * stride_lc, mask=l_mask, other=0.0)
        if SCALE_L:
            scale = tl.load(scale_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
            left = (left.to(tl.float32) * scale[None, :]).to(l_ptr.dtype.element_ty)
        r_mask = r_ok[:, None] & j_ok[None, :]
        right = tl.load(r_ptr + r_row[:, None] * stride_rr + j[None, :] * stride_rc, mask=r_mask, other=0.0)
        acc = _dot(left, right, acc, UPCAST, IEEE)
    d_ptrs = dw_ptr + slot.to(tl.int64) * stride_ds + i[:, None].to(tl.int64) * stride_dm + j[None, :] * stride_dn
    tl.store(d_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def check_moe_args(
    hidden_TD: torch.Tensor,
    gate_up_proj_E2ID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    topk_weights_TK: torch.Tensor | None,
    topk_ids_TK: torch.Tensor,
) -> None:
    """ValueError, saying what is expected, for arguments ``fused_moe`` cannot take (``topk_weights_TK`` None:
    the pairs' rows before the routing weights are asked for, ``experts_rows``)."""
    if hidden_TD.dim() != 2 or gate_up_proj_E2ID.dim() != 3 or down_proj_EDI.dim() != 3:
        raise ValueError(
            "expected hidden [T, D], gate_up_proj [E, 2I, D], down_proj [E, D, I]; got "
            f"{tuple(hidden_TD.shape)}, {tuple(gate_up_proj_E2ID.shape)}, {tuple(down_proj_EDI.shape)}"
        )
    T, D = hidden_TD.shape
    E, I2, D2 = gate_up_proj_E2ID.shape
    if D2 != D or I2 % 2 or down_proj_EDI.shape != (E, D, I2 // 2):
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden_TD.shape)}, gate_up_proj {tuple(gate_up_proj_E2ID.shape)} "
            f"(want [E, 2I, D]), down_proj {tuple(down_proj_EDI.shape)} (want [E, D, I])"
        )
    w = topk_weights_TK  # None: the pairs' rows are asked for, there are no weights to check
    w_shape = topk_ids_TK.shape if w is None else w.shape
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T or w_shape != topk_ids_TK.shape:
        raise ValueError(
            f"topk_weights {tuple(w_shape)} and topk_ids {tuple(topk_ids_TK.shape)} must both be [T={T}, K]"
        )
    if topk_ids_TK.dtype not in (torch.int32, torch.int64) or not (w is None or w.is_floating_point()):
        raise ValueError(
            "topk_ids must be int32/int64 and topk_weights float; got "
            f"{topk_ids_TK.dtype}, {None if w is None else w.dtype}"
        )
    if not hidden_TD.dtype == gate_up_proj_E2ID.dtype == down_proj_EDI.dtype:
        raise ValueError(
            f"hidden, gate_up_proj and down_proj must share a dtype, got {hidden_TD.dtype}, "
            f"{gate_up_proj_E2ID.dtype}, {down_proj_EDI.dtype}"
        )
    devices = {t.device for t in (hidden_TD, gate_up_proj_E2ID, down_proj_EDI, topk_ids_TK)}
    if w is not None:
        devices.add(w.device)
    if len(devices) != 1:
        raise ValueError(f"all fused_moe tensors must be on one device, got {sorted(map(str, devices))}")


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    return {"UPCAST": INTERPRETING and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def _launch_opts(cfg: TileConfig) -> dict[str, int]:
    opts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
    if not INTERPRETING:
        opts |= {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return opts


def _sum_topk(y_PN: torch.Tensor, ids_P: torch.Tensor, out_TN: torch.Tensor, num_slots: int, top_k: int) -> None:
    T, N = out_TN.shape
    grid = (triton.cdiv(T, _SUM_BLOCK_T), triton.cdiv(N, _SUM_BLOCK_N))
    _sum_topk_kernel[grid](
        y_PN, ids_P, out_TN, T, N, num_slots, y_PN.stride(0), out_TN.stride(0),
        TOP_K=top_k, BLOCK_T=_SUM_BLOCK_T, BLOCK_N=_SUM_BLOCK_N,
    )  # fmt: skip


def launch_forward(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    cfg: TileConfig,
    save_for_backward: bool,
) -> tuple[torch.Tensor, ...]:
    """-> (out_TD, act_NPI, preact_NP2I or empty, *SortedPairs.tensors())."""
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_S2ID.shape
    I, K = I2 // 2, ids_TK.shape[1]
    P = T * K
    dev, dtype = hidden_TD.device, hidden_TD.dtype
    ids_P = ids_TK.reshape(-1).contiguous()
    weights_P = weights_TK.reshape(-1).contiguous()
    meta = launch_sort_pairs(ids_TK, S, cfg.block_m)
    sorted_ids, block_slot, _, _, num_padded, _ = meta
    NP, NB = sorted_ids.shape[0], block_slot.shape[0]
    act = torch.empty(NP, I, device=dev, dtype=dtype)
    preact = torch.empty(NP if save_for_backward else 0, I2, device=dev, dtype=dtype)
    out = torch.empty(T, D, device=dev, dtype=dtype)
    if P == 0:
        return out, act, preact, *meta
    flags, opts = _dot_flags(dtype), _launch_opts(cfg)
    _gate_up_kernel[(NB, triton.cdiv(I, cfg.block_n))](
        hidden_TD, gate_up_S2ID, act, preact, sorted_ids, block_slot, num_padded, P, D, I, K,
        hidden_TD.stride(0), hidden_TD.stride(1), *gate_up_S2ID.stride(), act.stride(0), act.stride(1),
        preact.stride(0), preact.stride(1), SAVE_PREACT=save_for_backward, **flags, **opts,
    )  # fmt: skip
    y_PD = torch.empty(P, D, device=dev, dtype=torch.float32)
    _rows_gemm_kernel[(NB, triton.cdiv(D, cfg.block_n))](
        act, down_SDI, y_PD, weights_P, sorted_ids, block_slot, num_padded, P, D, I,
        act.stride(0), act.stride(1), down_SDI.stride(0), down_SDI.stride(2), down_SDI.stride(1),
        y_PD.stride(0), y_PD.stride(1), WEIGHTED=True, **flags, **opts,
    )  # fmt: skip
    _sum_topk(y_PD, ids_P, out, S, K)
    return out, act, preact, *meta


def launch_backward(
    dout_TD: torch.Tensor,
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    act_NPI: torch.Tensor,
    preact_NP2I: torch.Tensor,
    meta: SortedPairs,
    cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d_hidden_TD, d_gate_up_S2ID, d_down_SDI, d_weights_TK fp32)."""
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_S2ID.shape
    I, K = I2 // 2, ids_TK.shape[1]
    P = T * K
    dev, dtype = hidden_TD.device, hidden_TD.dtype
    dout_TD = dout_TD.contiguous()
    ids_P = ids_TK.reshape(-1).contiguous()
    weights_P = weights_TK.reshape(-1).contiguous()
    NP, NB = meta.sorted_pair_ids_NP.shape[0], meta.max_blocks
    sorted_ids, block_slot, num_padded = meta.sorted_pair_ids_NP, meta.block_slot_ids_NB, meta.num_padded_1
    flags, opts = _dot_flags(dtype), _launch_opts(cfg)

    nbn = triton.cdiv(I, cfg.block_n)
    dpreact = torch.empty(NP, I2, device=dev, dtype=dtype)
    dw_part = torch.zeros(nbn, NP, device=dev, dtype=torch.float32)
    if P:
        _down_bwd_kernel[(NB, nbn)](
            dout_TD, down_SDI, preact_NP2I, weights_P, dpreact, dw_part, sorted_ids, block_slot, num_padded,
            P, D, I, K, NP, dout_TD.stride(0), dout_TD.stride(1), *down_SDI.stride(),
            preact_NP2I.stride(0), preact_NP2I.stride(1), dpreact.stride(0), dpreact.stride(1), **flags, **opts,
        )  # fmt: skip
    # dL/dw per pair: sum the column blocks' shares (fixed order), then read each pair's position.
    dw_NP = dw_part.sum(dim=0)
    pos_P = meta.pair_pos_P.long()
    d_weights_TK = torch.where(pos_P >= 0, dw_NP[pos_P.clamp(min=0)], 0.0).view(T, K)

    d_hidden = torch.empty(T, D, device=dev, dtype=dtype)
    dx_PD = torch.empty(P, D, device=dev, dtype=torch.float32)
    if P:
        _rows_gemm_kernel[(NB, triton.cdiv(D, cfg.block_n))](
            dpreact, gate_up_S2ID, dx_PD, weights_P, sorted_ids, block_slot, num_padded, P, D, I2,
            dpreact.stride(0), dpreact.stride(1), *gate_up_S2ID.stride(), dx_PD.stride(0), dx_PD.stride(1),
            WEIGHTED=False, **flags, **opts,
        )  # fmt: skip
        _sum_topk(dx_PD, ids_P, d_hidden, S, K)
    else:
        d_hidden.zero_()

    d_gate_up = torch.empty(S, I2, D, device=dev, dtype=dtype)
    _slot_wgrad_kernel[(S, triton.cdiv(I2, cfg.block_m), triton.cdiv(D, cfg.block_n))](
        dpreact, hidden_TD, weights_P, d_gate_up, sorted_ids, meta.slot_start_S, meta.slot_count_S, I2, D, K,
        dpreact.stride(0), dpreact.stride(1), hidden_TD.stride(0), hidden_TD.stride(1), *d_gate_up.stride(),
        L_BY_TOKEN=False, R_BY_TOKEN=True, SCALE_L=False, **flags, **opts,
    )  # fmt: skip
    d_down = torch.empty(S, D, I, device=dev, dtype=dtype)
    _slot_wgrad_kernel[(S, triton.cdiv(D, cfg.block_m), triton.cdiv(I, cfg.block_n))](
        dout_TD, act_NPI, weights_P, d_down, sorted_ids, meta.slot_start_S, meta.slot_count_S, D, I, K,
        dout_TD.stride(0), dout_TD.stride(1), act_NPI.stride(0), act_NPI.stride(1), *d_down.stride(),
        L_BY_TOKEN=True, R_BY_TOKEN=False, SCALE_L=True, **flags, **opts,
    )  # fmt: skip
    return d_hidden, d_gate_up, d_down, d_weights_TK


# --------------------------------------------------------------------------------------------------
# custom ops (+ fakes)
# --------------------------------------------------------------------------------------------------


def _tile(tile: list[int]) -> TileConfig:
    block_m, block_n, block_k, num_warps, num_stages = tile
    return TileConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)


def _tile_list(cfg: TileConfig) -> list[int]:
    return [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages]


@torch.library.custom_op("moeflow::fused_moe_forward", mutates_args=())
def _forward_op(
    hidden_TD: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    tile: list[int],
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:  # fmt: skip
    return launch_forward(hidden_TD, gate_up, down, weights_TK, ids_TK, _tile(tile), save_for_backward)


@_forward_op.register_fake
def _(hidden_TD, gate_up, down, weights_TK, ids_TK, tile, save_for_backward):  # noqa: ANN001, ANN202
    from moeflow.kernels.metadata import padded_bound

    T, D = hidden_TD.shape
    S, I2, _ = gate_up.shape
    P = ids_TK.numel()
    NP = padded_bound(P, S, tile[0])
    dev, dtype = hidden_TD.device, hidden_TD.dtype

    def i32(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int32, device=dev)

    return (
        torch.empty(T, D, device=dev, dtype=dtype),
        torch.empty(NP, I2 // 2, device=dev, dtype=dtype),
        torch.empty(NP if save_for_backward else 0, I2, device=dev, dtype=dtype),
        i32(NP), i32(NP // tile[0]), i32(S), i32(S), i32(1), i32(P),
    )  # fmt: skip


@torch.library.custom_op("moeflow::fused_moe_backward", mutates_args=())
def _backward_op(
    dout_TD: torch.Tensor,
    hidden_TD: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    act: torch.Tensor,
    preact: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_slot: torch.Tensor,
    slot_start: torch.Tensor,
    slot_count: torch.Tensor,
    num_padded: torch.Tensor,
    pair_pos: torch.Tensor,
    tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = SortedPairs.from_tensors(
        (sorted_ids, block_slot, slot_start, slot_count, num_padded, pair_pos), tile[0], ids_TK.numel()
    )
    return launch_backward(dout_TD, hidden_TD, gate_up, down, weights_TK, ids_TK, act, preact, meta, _tile(tile))


@_backward_op.register_fake
def _(dout_TD, hidden_TD, gate_up, down, weights_TK, ids_TK, *rest):  # noqa: ANN001, ANN202
    return (
        torch.empty_like(hidden_TD),
        torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype),
        torch.empty(down.shape, device=down.device, dtype=down.dtype),
        torch.empty(weights_TK.shape, device=weights_TK.device, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------------
# autograd and the public entry point
# --------------------------------------------------------------------------------------------------


class FusedMoEFunction(torch.autograd.Function):
    """Differentiable fused MoE on the Triton path: gradients for hidden, both weight pools and the
    routing weights (the ids are integers and get none)."""

    @staticmethod
    def forward(ctx, hidden_TD, gate_up, down, weights_TK, ids_TK, tile):  # noqa: ANN001, ANN205
        out, act, preact, *meta = _forward_op(hidden_TD, gate_up, down, weights_TK, ids_TK, tile, True)
        ctx.save_for_backward(hidden_TD, gate_up, down, weights_TK, ids_TK, act, preact, *meta)
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, dout_TD):  # noqa: ANN001, ANN205
        hidden_TD, gate_up, down, weights_TK, ids_TK, act, preact, *meta = ctx.saved_tensors
        d_hidden, d_gate_up, d_down, d_weights = _backward_op(
            dout_TD, hidden_TD, gate_up, down, weights_TK, ids_TK, act, preact, *meta, ctx.tile
        )
        return d_hidden, d_gate_up, d_down, d_weights.to(weights_TK.dtype), None, None


def fused_moe(
    hidden_TD: torch.Tensor,
    gate_up_proj_E2ID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    config: TileConfig | None = None,
    cpu_gemm: str | None = None,
) -> torch.Tensor:
    """MoE expert MLP: out[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t,k].

    Weights in transformers' layout: ``gate_up_proj [E, 2I, D]`` (gate rows, then up rows) and
    ``down_proj [E, D, I]``. E may be a slot pool: ids index its first dimension, and an id outside
    [0, E) marks a pair not computed here (it contributes zero). Triton on a GPU or under
    ``TRITON_INTERPRET=1``; the fastest measured torch formulation on the CPU otherwise (same result
    within each dtype's rounding). Differentiable on both paths. ``config`` overrides the stored tile;
    ``cpu_gemm`` picks the CPU GEMM backend (``kernels.cpu.GEMMS``: ``"onednn"``, the measured
    fastest, or ``"mm"``, the library transformers' experts use).
    """
    check_moe_args(hidden_TD, gate_up_proj_E2ID, down_proj_EDI, topk_weights_TK, topk_ids_TK)
    if not use_triton(hidden_TD, gate_up_proj_E2ID, down_proj_EDI):
        return fused_moe_cpu(hidden_TD, gate_up_proj_E2ID, down_proj_EDI, topk_weights_TK, topk_ids_TK, cpu_gemm)
    T, D = hidden_TD.shape
    S, I2, _ = gate_up_proj_E2ID.shape
    cfg = config or get_config(T, S, D, I2 // 2, topk_ids_TK.shape[1], hidden_TD.dtype, hidden_TD.device)
    tile = _tile_list(cfg)
    args = (hidden_TD, gate_up_proj_E2ID, down_proj_EDI, topk_weights_TK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return FusedMoEFunction.apply(*args, topk_ids_TK, tile)
    return _forward_op(*args, topk_ids_TK, tile, False)[0]
