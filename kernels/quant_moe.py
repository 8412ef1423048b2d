"""The MoE expert MLP over a quantized slot pool in Triton: dequantization fused into a grouped GEMM.

Shape legend: T tokens, D hidden, I expert hidden, K experts per token, S slots, P = T*K pairs, NP padded
pair positions sorted by slot (``kernels.metadata``), NB = NP / BLOCK_M blocks; N output features and KD
input features of one projection, G scale groups along KD.

For pair p = t*K + k served by slot s with routing weight w (int8 / int4 / fp8 / mxfp4 formats of
``kernels.quant``; b_gu, b_d: the slot's expert biases where the family has them, else 0):

    h[pos]  = x[t] @ dequant(W_gu[s])^T + b_gu[s]        _quant_rows_kernel, A rows gathered by token
    a[pos]  = gate(h[pos])                               torch (the family's gate: SiLU-and-mul, gpt-oss's, ...)
    y[p]    = w * (a[pos] @ dequant(W_d[s])^T + b_d[s])  _quant_rows_kernel, A rows by sorted position
    out[t]  = y[t*K] + ... + y[t*K+K-1]          ``fused_moe``'s _sum_topk_kernel (k order, no atomics)

The weights are read from the pool as stored ([N, KD] int8, or int4's [N, KD/2] bytes of packed rows: in
each 32-row block, byte (k, d) holds rows d and d + 16 of column k; ``kernels.quant``) and dequantized tile by
tile in registers: no expert is ever materialized in floating point. int8's per-row scale multiplies the fp32
accumulator once (x @ (q*s) = (x @ q) * s up to rounding); int4's per-group scale multiplies the tile before
the dot. fp8 (e4m3 bytes, read as uint8) and mxfp4 (e2m1 nibbles, column 2j low; E8M0 exponents) are decoded
from their bits, exactly, with integer ops (no fp8 hardware or interpreter support needed), times the block's
scale. So the result is ``quantized_experts_forward(packed=False)``'s (the exact CPU formulation, bit-exact
with transformers on the dequantized weights) to fp32 rounding, not bit for bit;
tests/kernels/test_kernels_quant_triton.py
checks it under the interpreter with fp32 and fp16 activations, and on a GPU when one is present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeflow.kernels.cpu import Biases, Gate, silu_and_mul
from moeflow.kernels.fused_moe import _sum_topk
from moeflow.kernels.metadata import launch_sort_pairs
from moeflow.kernels.quant import GATE_UP_PIECES, MXFP4_BLOCK, QuantizedPool

_KINDS = {"int8": 0, "int4": 1, "fp8": 2, "mxfp4": 3}
TRITON_KINDS = tuple(_KINDS)  # the formats these kernels take (the engine's GPU path for them)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _e4m3fn_to_f32(b):
    """float8_e4m3fn bytes (int32 0..255) to fp32, exactly: built from the bits (exponent bias 7; subnormals m *
    2^-9; 0x7F / 0xFF NaN), so it needs no fp8 support from the GPU or the interpreter."""
    e = (b >> 3) & 0xF
    m = b & 0x7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True))
    v = tl.where(b >> 7 == 1, -mag, mag)
    return tl.where((e == 15) & (m == 7), float("nan"), v)


@triton.jit
def _e2m1_times_e8m0(code, e8):
    """An MXFP4 weight: the e2m1 code (0..15: sign, 2 exponent bits, 1 mantissa bit; values 0, 0.5, 1, 1.5, 2, 3,
    4, 6) times its block's E8M0 scale 2^(e8 - 127), both from bits: exact, as transformers' dequantization."""
    mag = code & 7
    e = mag >> 1
    twice = tl.where(e == 0, mag & 1, (2 + (mag & 1)) << tl.maximum(e - 1, 0))
    v = tl.where(code >= 8, -twice.to(tl.float32), twice.to(tl.float32)) * 0.5
    scale = tl.where(e8 == 0, 5.877471754111438e-39, (e8 << 23).to(tl.float32, bitcast=True))  # 2^-127 is subnormal
    return v * scale


@triton.jit
def _quant_rows_kernel(
    a_ptr,  # [rows, KD] activations: rows by token (GATHER) or by sorted position
    q_ptr,  # [S, N, KD] int8 / fp8 bytes, or [S, N, KD/2] uint8 (int4: each slot's rows contiguous; mxfp4)
    scale_ptr,  # int8 fp32 [S, N, 1], int4 bf16 [S, N, cdiv(KD, GROUP)], fp8 fp32 [S, N/SR, KD/GROUP], mxfp4 uint8
    bias_ptr,  # [S, N], read when HAS_BIAS
    out_ptr,  # [NP or P, N] fp32
    topk_w_ptr,  # [P] routing weights, read when WEIGHTED
    sorted_ptr,  # [NP] int32 pair ids by sorted position
    block_slot_ptr,  # [NB] int32
    num_padded_ptr,  # [1] int32
    P,
    N,
    KD,
    stride_am,
    stride_ak,
    stride_qs,
    stride_qn,
    stride_qk,
    stride_ss,
    stride_sn,
    stride_sg,
    stride_bs,
    stride_om,
    stride_on,
    TOP_K: tl.constexpr,
    KIND: tl.constexpr,  # 0 int8, 1 int4, 2 fp8 (block-wise), 3 mxfp4
    GROUP: tl.constexpr,  # columns per scale (int4, fp8, mxfp4)
    SCALE_ROWS: tl.constexpr,  # rows per scale (fp8's block rows; else 1)
    PIECE,  # int4: rows per packed piece (gate_up: its halves; down: all its rows)
    HAS_BIAS: tl.constexpr,  # add the slot's bias to each row (gpt-oss), before the routing weight
    GATHER: tl.constexpr,  # A rows are tokens: row = pair // TOP_K; else sorted positions
    WEIGHTED: tl.constexpr,  # multiply by the pair's routing weight, store by pair; else store by position
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (NB, cdiv(N, BLOCK_N)). out[row] = a[row] @ dequant(q[slot])^T for the block's BLOCK_M positions,
    all served by one slot. Activations of any float dtype are cast to fp32; accumulation is fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    pos = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair = tl.load(sorted_ptr + pos).to(tl.int64)
    row_ok = pair < P
    a_row = pair // TOP_K if GATHER else pos
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    if KIND == 1:  # row n's byte of column k in int4's packed pieces (kernels.quant): byte_n + k * step_n
        piece = n // PIECE
        r = n - piece * PIECE
        full = PIECE // 32 * 32
        in_block = r < full
        row_bytes = KD // 2
        byte_n = piece * PIECE * row_bytes + tl.where(
            in_block, (r // 32) * 32 * row_bytes + r % 16, full * row_bytes + (r - full) // 2
        )
        step_n = tl.where(in_block, 16, (PIECE - full) // 2)
        high_n = tl.where(in_block, r % 32 >= 16, (r - full) % 2 == 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        k = k0 + kk
        k_ok = k < KD
        a = tl.load(a_ptr + a_row[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        w_mask = k_ok[:, None] & n_ok[None, :]
        if KIND == 0:
            q_ptrs = q_ptr + slot * stride_qs + n[None, :] * stride_qn + k[:, None] * stride_qk
            w = tl.load(q_ptrs, mask=w_mask, other=0).to(tl.float32)
        elif KIND == 1:
            b = tl.load(q_ptr + slot * stride_qs + (byte_n[None, :] + k[:, None] * step_n[None, :]), mask=w_mask,
                        other=0).to(tl.int32)  # fmt: skip
            code = tl.where(high_n[None, :], b >> 4, b & 0xF)
            s = tl.load(scale_ptr + slot * stride_ss + n[None, :] * stride_sn + (k // GROUP)[:, None] * stride_sg,
                        mask=w_mask, other=0.0).to(tl.float32)  # fmt: skip
            w = (code - 8).to(tl.float32) * s
        elif KIND == 2:
            b = tl.load(q_ptr + slot * stride_qs + n[None, :] * stride_qn + k[:, None] * stride_qk, mask=w_mask,
                        other=0).to(tl.int32)  # fmt: skip
            s_ptrs = (scale_ptr + slot * stride_ss + (n // SCALE_ROWS)[None, :] * stride_sn
                      + (k // GROUP)[:, None] * stride_sg)  # fmt: skip
            w = _e4m3fn_to_f32(b) * tl.load(s_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        else:
            b = tl.load(q_ptr + slot * stride_qs + n[None, :] * stride_qn + (k // 2)[:, None] * stride_qk, mask=w_mask,
                        other=0).to(tl.int32)  # fmt: skip
            code = tl.where((k % 2 == 1)[:, None], b >> 4, b & 0xF)  # column 2j low nibble, 2j + 1 high
            e8 = tl.load(scale_ptr + slot * stride_ss + n[None, :] * stride_sn + (k // GROUP)[:, None] * stride_sg,
                         mask=w_mask, other=0).to(tl.int32)  # fmt: skip
            w = _e2m1_times_e8m0(code, e8)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    if KIND == 0:
        acc = acc * tl.load(scale_ptr + slot * stride_ss + n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + slot * stride_bs + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if WEIGHTED:
        acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out_row = pair
    else:
        out_row = pos
    tl.store(out_ptr + out_row[:, None] * stride_om + n[None, :] * stride_on, acc, mask=row_ok[:, None] & n_ok[None, :])


def _launch_rows(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 weights_P: torch.Tensor, meta: tuple, pool: QuantizedPool, top_k: int, *, gather: bool,
                 weighted: bool, pieces: int) -> None:  # fmt: skip
    sorted_ids, block_slot, _, _, num_padded, _ = meta
    N, KD = q.shape[1], a.shape[1]
    fmt = pool.fmt
    assert fmt.kind != "int4" or q[0].is_contiguous(), "int4 pieces are addressed as bytes of a contiguous slot"
    if q.dtype == torch.float8_e4m3fn:
        q = q.view(torch.uint8)  # decoded from its bits in the kernel
    group = {"int4": fmt.group_size, "fp8": fmt.block[1], "mxfp4": MXFP4_BLOCK}.get(fmt.kind, 1)
    _quant_rows_kernel[(block_slot.shape[0], triton.cdiv(N, BLOCK_N))](
        a, q, scale, out if bias is None else bias, out, weights_P, sorted_ids, block_slot, num_padded,
        weights_P.numel(), N, KD, a.stride(0), a.stride(1), *q.stride(), *scale.stride(),
        0 if bias is None else bias.stride(0), out.stride(0), out.stride(1),
        TOP_K=top_k, KIND=_KINDS[fmt.kind], GROUP=group, SCALE_ROWS=fmt.block[0] if fmt.kind == "fp8" else 1,
        PIECE=N // pieces, HAS_BIAS=bias is not None, GATHER=gather, WEIGHTED=weighted, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip


def quant_fused_moe(
    x_TD: torch.Tensor,
    pool: QuantizedPool,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: Biases = None,
) -> torch.Tensor:
    """``quantized_experts_forward`` with Triton kernels (GPU, or the interpreter): int8, int4, fp8 and mxfp4 pools.
    Slot ids outside [0, S) contribute 0. ``biases``: per slot, as ``experts_forward`` takes them, added after
    each projection. Returns [T, D] in x's dtype."""
    if pool.fmt.kind not in _KINDS:
        raise ValueError(f"the Triton quantized kernels take {', '.join(_KINDS)} pools, not {pool.fmt.name}")
    if x_TD.shape[1] != pool.hidden:
        raise ValueError(f"activations have {x_TD.shape[1]} features, the quantized experts expect {pool.hidden}")
    T, D = x_TD.shape
    S, K, I = pool.gate_up_q.shape[0], ids_TK.shape[1], pool.inter
    assert pool.gate_up_scale is not None and pool.down_scale is not None
    out = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)
    if T * K == 0:
        return out
    meta = launch_sort_pairs(ids_TK, S, BLOCK_M)
    NP = meta[0].shape[0]
    weights_P = weights_TK.reshape(-1).contiguous()
    h = torch.zeros(NP, 2 * I, device=x_TD.device, dtype=torch.float32)
    gu_bias, d_bias = (None, None) if biases is None else biases
    _launch_rows(x_TD, pool.gate_up_q, pool.gate_up_scale, gu_bias, h, weights_P, meta, pool, K, gather=True,
                 weighted=False, pieces=GATE_UP_PIECES)  # fmt: skip
    act = (gate or silu_and_mul)(h.to(x_TD.dtype)).contiguous()
    y = torch.zeros(T * K, D, device=x_TD.device, dtype=torch.float32)
    _launch_rows(act, pool.down_q, pool.down_scale, d_bias, y, weights_P, meta, pool, K, gather=False, weighted=True,
                 pieces=1)  # fmt: skip
    _sum_topk(y, ids_TK.reshape(-1).contiguous(), out, S, K)
    return out
