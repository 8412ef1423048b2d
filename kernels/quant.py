"""Quantized expert weights: the formats, quantize / dequantize, and the expert MLP over a quantized slot pool.

Shape legend: ``moeflow/__init__.py`` (T tokens, D hidden, I expert intermediate, S slots, K top-k);
here also N rows (output features) and C columns (input features) of one projection, and G groups of
columns sharing a scale. The on-disk layout is documented in ``docs/quantization.md``.

Formats (``ExpertFormat``), per projection weight ``w_NC`` (gate and up are [I, D], down is [D, I]):

- ``int8``: per output channel, symmetric. ``scale_N1`` fp32 = max|w[n]| / 127 (1 for an all-zero row),
  ``q_NC`` int8 = round(w / scale) in [-127, 127]. Dequantized: ``q * scale`` in fp32.
- ``int4``: group-wise along the input columns, symmetric, groups of ``group_size`` columns (the last
  group holds the remainder when ``group_size`` does not divide C). ``scale_NG`` bf16 = max|w[group]| / 7,
  rounded to bf16 first, ``q`` = round(w / scale) in [-8, 7], stored as the code q + 8 (0..15), two per byte,
  in torch's CPU int4 matmul layout (``torch._convert_weight_to_int4pack_for_cpu`` on AVX2), so a miss is
  read straight into the slot and computed from there: rows in blocks of 32; for block b and column k, 16
  bytes, byte d holding row 32b + d in its low nibble and row 32b + d + 16 in its high one; the last block of
  R < 32 rows (R even) holds, per column k, R/2 bytes pairing rows 2j (low) and 2j + 1 (high). ``q_N(C/2)``
  uint8 (N and C even). A slot's gate_up [2I, D] is packed as its two halves (GATE_UP_PIECES: gate and up
  rows, each as its own matrix, as ``moeflow quantize`` stores them), so halves whose I is not a multiple of
  32 still compose. Repacking at every miss instead would cost ~10 ms per I/O-bound expert with torch's
  converter (1.5-1.7 ms a projection with torch ops), against ~1.3 ms to compute it (bench/quantized.py
  --part kernels). Dequantized: ``(code - 8) * float(scale)`` in fp32. Symmetric, without zero points: a
  zero point per group would add 2 bytes per group (6.25% more bytes at group 128, past the 1/8-of-fp32
  target) for the asymmetric range; measured perplexity with the symmetric form is in
  bench/results/quantized. bf16 scales (fp16 before format version 2): torch's matmul takes bf16 scales,
  so the weights it multiplies are exactly the stored ones.
- ``bf16`` / ``fp16``: the weights cast, no scale. Dequantized: cast to the compute dtype.
- ``fp8``: DeepSeek-V3's block-wise FP8 (float8_e4m3fn), as its checkpoints ship it: ``weight_scale_inv``
  fp32 ``[N / bm, C / bn]`` per block of ``block`` = (bm, bn) (128 x 128 in DeepSeek-V3); dequantized
  ``float(q) * scale_inv`` of the block, transformers' ``Fp8Dequantize`` formula. Read, never written here
  except by ``quantize`` (scale = max|w[block]| / 448), which tests use to build such checkpoints.
- ``mxfp4``: gpt-oss's MXFP4 experts: FP4 (e2m1) codes two per byte, column 2j in the low nibble and 2j+1 in
  the high one (``q_N(C/2)`` uint8, the checkpoint's ``*_blocks`` [.., C/32, 16] flattened), and one E8M0
  exponent per 32 columns (``scale_N(C/32)`` uint8). Dequantized ``FP4[code] * 2^(e - 127)``, transformers'
  ``convert_moe_packed_tensors`` formula (exact in fp32). ``quantize``: e = ceil(log2(max|w| / 6)) + 127,
  codes rounded to the nearest e2m1 value; tests use it to build such checkpoints.

Expert compute (``quantized_experts_forward``), on the CPU, by measurement: a slot of an int8 / int4 pool serving
at most PACKED_MAX_ROWS (token, k) rows goes through torch's packed matmuls with bf16 activations:
``torch._weight_int8pack_mm`` (the fp32 row scale applied to its output, not rounded to bf16) and
``torch._weight_int4pack_mm_for_cpu`` (the bf16 scales as stored, zero points 0; a group that does not divide C
is passed as torch groups of gcd(group, C) >= 32 with repeated scales). Activations are rounded to bf16 going
in and the output is bf16 coming out, so the result is within PACKED_ATOL x max|output| of the exact
formulation (measured up to 1.8e-2 x; at the logits of the test models up to 3.0e-4 x max|logits|,
tests/engine/test_engine_quantized.py). A projection those kernels cannot take (int4 pieces whose rows are not a
multiple of 16, a C without a 32-column group, a torch whose int4 layout differs: AVX-512 blocks 64 rows), any
other format, more rows per slot, other activation dtypes, or ``packed=False`` (the engine's
``exact_quantized``) dequantize the slot into one expert-sized scratch buffer in the compute dtype and compute
with the exact path's arithmetic (``kernels.cpu``), equal bit for bit to transformers' grouped_mm experts run
on the dequantized weights (tests/kernels/test_kernels_quant.py).

Measured (bench/quantized.py --part kernels: the I/O-bound model's expert, I 8192 x D 192, T = 1, one thread,
experts rotating over 16 slots, median of interleaved rounds; 2-core AMD EPYC, load ~2 from other work), ms per
expert: fp32 slots 2.48; int8 dequantize + mm 4.54, packed 1.01; int4-g128 dequantize + mm 8.17, packed 1.27.
Per projection, hot in cache (16384 x 192, x [1, 192]): fp32 mm 0.42-0.51; int8pack with fp32 or fp16
activations 2.9-3.3 (with bf16 0.28); int4pack fp32 or fp16 6.2-6.4 (bf16 0.44-0.50): only bf16 activations are
fast on AVX2. Rows per slot (16384 x 192, ms, int8 dequantize + mm / packed; int4 likewise): 1: 1.09 / 0.28,
1.96 / 0.45; 4: 2.0 / 0.68, 3.3 / 0.61; 16: 3.6 / 2.7, 5.8 / 2.5; 32: 5.1 / 5.5, 6.6 / 5.0: packed up to 16.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from moeflow.kernels.cpu import (
    GEMMS,
    Biases,
    Gate,
    _slot_biases,
    _sorted_by_slot,
    _unsort,
    _weight_and_sum,
    silu_and_mul,
)

QuantKind = Literal["int8", "int4", "bf16", "fp16", "fp8", "mxfp4"]
QUANT_KINDS: tuple[str, ...] = ("int8", "int4", "bf16", "fp16", "fp8", "mxfp4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 128

_INT8_MAX = 127
_INT4_MAX = 7  # scale = max|w| / 7; rounding may reach -8 only through the bf16 scale's rounding
INT4_BLOCK_ROWS = 32  # rows per packed int4 block (torch's CPU int4pack layout on AVX2)
GATE_UP_PIECES = 2  # a slot's int4 gate_up [2I, *] is packed as its two halves (as moeflow quantize stores them)
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes
MXFP4_BLOCK = 32  # columns per E8M0 exponent


@dataclass(frozen=True, kw_only=True)
class ExpertFormat:
    """How one projection weight is stored: the quantized tensor's dtype and shape, and its scale's."""

    kind: QuantKind
    group_size: int = 0  # int4: columns per scale; else 0
    block: tuple[int, int] = (0, 0)  # fp8: (rows, columns) per scale; else (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in QUANT_KINDS:
            raise ValueError(f"unknown expert format {self.kind!r}; supported: {', '.join(QUANT_KINDS)}")
        if (self.kind == "fp8") != (min(self.block) > 0):
            raise ValueError(f"{self.kind}: a scale block (rows, columns) is for fp8 only, got {self.block}")
        if self.kind == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size} is not supported; use one of {INT4_GROUP_SIZES}")
        if self.kind != "int4" and self.group_size:
            raise ValueError(f"{self.kind} has no group size (got {self.group_size}); only int4 is group-wise")

    @property
    def name(self) -> str:
        if self.kind == "fp8":
            return f"fp8-b{self.block[0]}x{self.block[1]}"
        return f"int4-g{self.group_size}" if self.kind == "int4" else self.kind

    @property
    def weight_dtype(self) -> torch.dtype:
        packed = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn, "mxfp4": torch.uint8}
        return packed.get(self.kind) or _CAST[self.kind]

    @property
    def scale_dtype(self) -> torch.dtype | None:
        scales = {"int8": torch.float32, "int4": torch.bfloat16, "fp8": torch.float32, "mxfp4": torch.uint8}
        return scales.get(self.kind)

    @property
    def packing(self) -> int:
        """Weight columns per stored element (two nibbles a byte for int4 and mxfp4)."""
        return 2 if self.kind in ("int4", "mxfp4") else 1

    @property
    def scale_rows(self) -> int:
        """Weight rows per scale row (a stored piece's first row maps to its scale's first row by this)."""
        return self.block[0] if self.kind == "fp8" else 1

    def weight_shape(self, rows: int, cols: int) -> tuple[int, int]:
        if self.kind == "mxfp4":
            self.scale_shape(rows, cols)  # refuses a partial block
            return (rows, cols // 2)
        if self.kind == "int4":
            if cols % 2 or rows % 2:
                raise ValueError(
                    f"int4 packs two rows per byte and stores C/2 bytes a row: a {rows} x {cols} projection cannot be "
                    "packed (both sizes must be even)"
                )
            return (rows, cols // 2)
        return (rows, cols)

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int] | None:
        if self.kind == "mxfp4":
            if cols % MXFP4_BLOCK:
                raise ValueError(f"mxfp4 scales whole blocks of {MXFP4_BLOCK} columns; a weight has {cols} columns")
            return (rows, cols // MXFP4_BLOCK)
        if self.kind == "fp8":
            bm, bn = self.block
            if rows % bm or cols % bn:
                raise ValueError(f"a {rows} x {cols} weight is not a whole number of {bm} x {bn} fp8 scale blocks")
            return (rows // bm, cols // bn)
        if self.kind == "int8":
            return (rows, 1)
        if self.kind == "int4":
            return (rows, math.ceil(cols / self.group_size))
        return None

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of one projection in this format, scales included."""
        n = math.prod(self.weight_shape(rows, cols)) * self.weight_dtype.itemsize
        shape = self.scale_shape(rows, cols)
        if shape is not None:
            assert self.scale_dtype is not None
            n += math.prod(shape) * self.scale_dtype.itemsize
        return n


def quantize(w_NC: torch.Tensor, fmt: ExpertFormat, *, pieces: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w_NC`` (any float dtype) -> (quantized weight, scale or None) in ``fmt`` (module docstring). ``pieces``:
    int4 packs that many equal row pieces each on its own (a slot's gate_up is its two halves: GATE_UP_PIECES)."""
    w = w_NC.detach().to(torch.float32)
    if fmt.kind in _CAST:
        return w_NC.detach().to(_CAST[fmt.kind]).contiguous(), None
    rows, cols = w.shape
    if fmt.kind == "mxfp4":
        groups = fmt.scale_shape(rows, cols)[1]
        blocks = w.view(rows, groups, MXFP4_BLOCK)
        amax = blocks.abs().amax(dim=2, keepdim=True)
        exp = torch.ceil(torch.log2(torch.where(amax > 0, amax / 6.0, torch.ones_like(amax)))).clamp_(-127, 127)
        scaled = blocks / torch.ldexp(torch.ones_like(exp), exp.int())
        values = torch.tensor(_FP4_VALUES[:8])
        code = (scaled.abs()[..., None] - values).abs().argmin(dim=-1).to(torch.uint8)  # nearest magnitude
        code |= (scaled < 0).to(torch.uint8) << 3
        code = code.view(rows, cols)
        packed = code[:, 0::2] | (code[:, 1::2] << 4)
        return packed.contiguous(), (exp.view(rows, groups) + 127).to(torch.uint8).contiguous()
    if fmt.kind == "fp8":
        (rb, cb), (bm, bn) = fmt.scale_shape(rows, cols), fmt.block
        blocks = w.view(rb, bm, cb, bn)
        amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        q = (blocks / scale).to(torch.float8_e4m3fn).view(rows, cols)
        return q.contiguous(), scale.view(rb, cb).contiguous()
    if fmt.kind == "int8":
        amax_N1 = w.abs().amax(dim=1, keepdim=True)
        scale_N1 = torch.where(amax_N1 > 0, amax_N1 / _INT8_MAX, torch.ones_like(amax_N1))
        q = torch.round(w / scale_N1).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return q.contiguous(), scale_N1.contiguous()
    fmt.weight_shape(rows, cols)  # refuses an odd column or row count
    g = fmt.group_size
    groups = math.ceil(cols / g)
    padded = torch.nn.functional.pad(w, (0, groups * g - cols)).view(rows, groups, g)
    amax_NG = padded.abs().amax(dim=2)
    scale_NG = torch.where(amax_NG > 0, amax_NG / _INT4_MAX, torch.ones_like(amax_NG)).to(torch.bfloat16)
    scale_NG = torch.where(scale_NG > 0, scale_NG, torch.ones_like(scale_NG))  # a bf16 underflow: q stays 0
    q = torch.round(padded / scale_NG.float()[:, :, None]).clamp_(-8, 7).view(rows, groups * g)[:, :cols]
    codes = (q + 8).to(torch.uint8)  # offset binary: code = q + 8 in [0, 15]
    piece = rows // pieces
    if piece % 2 or rows % pieces:
        raise ValueError(f"int4 packs rows in pairs: {rows} rows cannot be packed as {pieces} pieces of even rows")
    packed = torch.cat([_pack_int4_rows(codes[p * piece : (p + 1) * piece]) for p in range(pieces)])
    return packed, scale_NG.contiguous()


def _pack_int4_rows(codes_NC: torch.Tensor) -> torch.Tensor:
    """Codes [N, C] (uint8, 0..15) -> [N, C/2] bytes in the int4 layout (module docstring; torch's CPU int4pack)."""
    N, C = codes_NC.shape
    full = N // INT4_BLOCK_ROWS * INT4_BLOCK_ROWS
    out = torch.empty(N * C // 2, dtype=torch.uint8)
    blocks = codes_NC[:full].reshape(-1, 2, INT4_BLOCK_ROWS // 2, C)  # [NB, low/high, d, C]
    out[: full * C // 2].view(-1, C, INT4_BLOCK_ROWS // 2).copy_((blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2))
    tail = codes_NC[full:]
    out[full * C // 2 :].view(C, -1).copy_((tail[0::2] | (tail[1::2] << 4)).t())
    return out.view(N, C // 2)


def _unpack_int4_rows(packed: torch.Tensor, out_NC: torch.Tensor) -> torch.Tensor:
    """The values q = code - 8 of one packed piece [N, C/2] into ``out_NC`` (any dtype that holds -8..7).

    Bytes are transposed back to row order first (one uint8 pass), then each nibble plane fills whole rows: 1.9 vs
    4.4 ms for a 16384 x 192 gate_up into fp32 with the nibbles split first (measured, 2-core EPYC, one thread)."""
    N, C = out_NC.shape
    half = INT4_BLOCK_ROWS // 2
    full = N // INT4_BLOCK_ROWS * INT4_BLOCK_ROWS
    flat = packed.reshape(-1)
    rowwise = torch.empty(N // 2, C, dtype=torch.uint8)  # byte r of block b: rows 32b + r (low), 32b + 16 + r
    rowwise[: full // 2].view(-1, half, C).copy_(flat[: full * C // 2].view(-1, C, half).transpose(1, 2))
    rowwise[full // 2 :].copy_(flat[full * C // 2 :].view(C, -1).t())  # the tail: rows 2j (low), 2j + 1
    low = (rowwise & 0xF).view(torch.int8).sub_(8)
    high = (rowwise >> 4).view(torch.int8).sub_(8)
    blocks = out_NC[:full].view(-1, 2, half, C)
    blocks[:, 0].copy_(low[: full // 2].view(-1, half, C))
    blocks[:, 1].copy_(high[: full // 2].view(-1, half, C))
    pairs = out_NC[full:].view(-1, 2, C)
    pairs[:, 0].copy_(low[full // 2 :])
    pairs[:, 1].copy_(high[full // 2 :])
    return out_NC


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: ExpertFormat,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    pieces: int = 1,
) -> torch.Tensor:
    """The weight ``[N, C]`` in ``dtype`` from its stored form (into ``out`` when given, [N, C] contiguous);
    ``pieces`` as ``quantize`` packed it."""
    rows = q.shape[0]
    cols = q.shape[1] * 2 if fmt.kind in ("int4", "mxfp4") else q.shape[1]
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    if fmt.kind in _CAST:
        return out.copy_(q)
    assert scale is not None, f"{fmt.kind} weights need their scale"
    if fmt.kind == "mxfp4":  # transformers' convert_moe_packed_tensors: FP4[code] * 2^(e - 127), exact in fp32
        lut = torch.tensor(_FP4_VALUES, dtype=out.dtype, device=q.device)
        pairs = out.view(rows, cols // 2, 2)
        pairs[:, :, 0] = lut[(q & 0x0F).int()]
        pairs[:, :, 1] = lut[(q >> 4).int()]
        exp = (scale.to(torch.int32) - 127).repeat_interleave(MXFP4_BLOCK, dim=1)
        return torch.ldexp(out, exp, out=out)
    if fmt.kind == "fp8":  # transformers' Fp8Dequantize: float(q) * scale_inv of the block, in fp32
        (rb, cb), (bm, bn) = scale.shape, fmt.block
        prod = q.to(torch.float32).view(rb, bm, cb, bn) * scale.view(rb, 1, cb, 1).to(torch.float32)
        return out.copy_(prod.view(rows, cols))
    if fmt.kind == "int8":
        # q * s rounded once, as q.float() * s; a mixed-dtype torch.mul(q, s, out=) is 5-8x slower (1.2-2.0 vs 0.25 ms)
        return out.copy_(q).mul_(scale)
    piece = rows // pieces
    for p in range(pieces):
        _unpack_int4_rows(q[p * piece : (p + 1) * piece], out[p * piece : (p + 1) * piece])
    g = fmt.group_size
    full = cols // g
    s = scale.to(out.dtype)
    if full:
        out[:, : full * g].view(rows, full, g).mul_(s[:, :full, None])
    if cols % g:
        out[:, full * g :].mul_(s[:, full:])
    return out


@dataclass(frozen=True, kw_only=True)
class QuantizedPool:
    """A slot pool of quantized experts: ``gate_up_q [S, 2I, *]`` and ``down_q [S, D, *]`` in ``fmt``'s weight
    layout, their scales ``[S, 2I, G]`` / ``[S, D, G]`` (None for bf16/fp16), and the sizes I and D.
    int4 on the CPU: ``*_scale_zeros``, where the pool keeps them, the same scales in torch's int4 matmul layout
    ``[S, P, C / group, rows, 2]`` (``fill_int4pack_scales``), so a use does not rebuild them."""

    fmt: ExpertFormat
    gate_up_q: torch.Tensor
    down_q: torch.Tensor
    gate_up_scale: torch.Tensor | None
    down_scale: torch.Tensor | None
    inter: int
    hidden: int
    gate_up_scale_zeros: torch.Tensor | None = None
    down_scale_zeros: torch.Tensor | None = None

    def slot_hidden(
        self, s: int, x_nD: torch.Tensor, gate: Gate, bias_2I: torch.Tensor | None, scratch: torch.Tensor,
        packed: bool,
    ) -> torch.Tensor:  # fmt: skip
        """Slot ``s``'s gate/up projection through the gate, ``[n, I]``: with ``packed``, through torch's packed CPU
        matmul (bf16 activations; module docstring) where it takes the projection, else dequantized into
        ``scratch`` (``[2I, D]``, x's dtype) and multiplied in x's dtype. Needs only the slot's gate/up weights and
        scales (and ``gate_up_scale_zeros``, where the pool keeps them)."""
        h_n2I = None
        if packed:
            gu_sz = self.gate_up_scale_zeros
            h_n2I = _packed_linear(x_nD, self.gate_up_q[s], self.gate_up_scale[s], self.fmt, GATE_UP_PIECES,
                                   None if gu_sz is None else gu_sz[s])  # fmt: skip
        if h_n2I is None:
            gu_scale = None if self.gate_up_scale is None else self.gate_up_scale[s]
            h_n2I = GEMMS["mm"](x_nD, dequantize(self.gate_up_q[s], gu_scale, self.fmt, out=scratch,
                                                 pieces=GATE_UP_PIECES))  # fmt: skip
        if bias_2I is not None:
            h_n2I.add_(bias_2I)
        return gate(h_n2I)

    def slot_output(
        self, s: int, a_nI: torch.Tensor, bias_D: torch.Tensor | None, scratch: torch.Tensor, packed: bool
    ) -> torch.Tensor:
        """``slot_hidden``'s second half: slot ``s``'s down projection of ``a_nI``, ``[n, D]`` (``scratch``:
        ``[D, I]``; ``packed`` as there)."""
        y_nD = None
        if packed:
            d_sz = self.down_scale_zeros
            y_nD = _packed_linear(a_nI, self.down_q[s], self.down_scale[s], self.fmt, 1,
                                  None if d_sz is None else d_sz[s])  # fmt: skip
        if y_nD is None:
            d_scale = None if self.down_scale is None else self.down_scale[s]
            y_nD = GEMMS["mm"](a_nI, dequantize(self.down_q[s], d_scale, self.fmt, out=scratch))
        if bias_D is not None:
            y_nD.add_(bias_D)
        return y_nD


PACKED_KINDS = ("int8", "int4")
PACKED_MAX_ROWS = 16  # rows of one slot up to which the packed matmuls beat dequantize + mm (module docstring)
# torch's CPU int8 matmul takes the columns 8 at a time on AVX2 and 16 at a time on AVX-512 (an AMD EPYC with
# avx512_bf16/vnni): with another column count it reads past each row (wrong sums, or a crash; measured on torch 2.13:
# 2 x 20 activations on AVX2; on AVX-512 C = 24, 40, 56, 72 crash from 2 rows and C = 8 is garbage at 1 row, while
# C = 16, 32, 48, 80, 96 are right). Such projections (tiny test geometries; real models' widths are multiples of 64)
# are dequantized instead.
INT8PACK_COLS = 16
# The packed formulation's tolerance: |packed - exact| <= PACKED_ATOL * max|exact| over an experts call's output
# (bf16 rounding of each projection's input and output, grown by cancellation in the down projection's sums;
# measured up to 4.6e-3 on normal random experts, 1.8e-2 on experts whose rows span four decades of scale).
PACKED_ATOL = 4e-2


@functools.cache
def _int4pack_layout_matches() -> bool:
    """Whether this torch's CPU int4pack layout is the stored one (it is on AVX2; AVX-512 blocks 64 rows)."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return False
    codes = torch.randint(0, 16, (3 * INT4_BLOCK_ROWS // 2, 64), generator=torch.Generator().manual_seed(0))
    want = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    return bool(want.shape == (codes.shape[0], 32) and torch.equal(want, _pack_int4_rows(codes.to(torch.uint8))))


def int4pack_scales_shape(fmt: ExpertFormat, rows: int, cols: int, pieces: int) -> tuple[int, int, int] | None:
    """(pieces, torch groups, rows per piece) of the bf16 scale + zero point tensor that torch's CPU int4 matmul
    takes for a ``rows x cols`` int4 projection stored as ``pieces``, or None where that matmul cannot take it."""
    if fmt.kind != "int4":
        return None
    if rows // pieces % INT4_BLOCK_ROWS == 0:  # whole blocks: the pieces side by side are one matrix, one call
        pieces = 1
    group = math.gcd(fmt.group_size, cols)  # torch's groups divide C: a partial last group is repeated scales
    if rows // pieces % (INT4_BLOCK_ROWS // 2) or group < 32 or not _int4pack_layout_matches():
        return None
    return pieces, cols // group, rows // pieces


def int4pack_scales_shapes(fmt: ExpertFormat, inter: int, hidden: int) -> tuple[tuple[int, ...] | None, ...]:
    """``int4pack_scales_shape`` of an expert's gate_up and down projections (None for one the matmul cannot take)."""
    return (int4pack_scales_shape(fmt, 2 * inter, hidden, GATE_UP_PIECES), int4pack_scales_shape(fmt, hidden, inter, 1))


def int4pack_scales_nbytes(fmt: ExpertFormat, inter: int, hidden: int) -> int:
    """Bytes per slot of an expert's scales kept in torch's int4 matmul layout (bf16 scale + zero point)."""
    return sum(4 * math.prod(shape) for shape in int4pack_scales_shapes(fmt, inter, hidden) if shape is not None)


def fill_int4pack_scales(scale_NG: torch.Tensor, fmt: ExpertFormat, cols: int, out_PGR2: torch.Tensor) -> None:
    """Stored int4 scales ``[N, G]`` of a projection with ``cols`` columns into the scale halves ``[..., 0]`` of
    torch's ``[P, C / group, rows, 2]`` (``int4pack_scales_shape``), each stored group's scale into every torch
    group it covers. The zero-point halves are not written: the caller's buffer holds zeros there."""
    pieces, groups, rows = out_PGR2.shape[:3]
    s_PGR = scale_NG.view(pieces, rows, -1).transpose(1, 2)
    per, full = fmt.group_size // math.gcd(fmt.group_size, cols), cols // fmt.group_size
    if full:
        out_PGR2[:, : full * per].view(pieces, full, per, rows, 2)[..., 0] = s_PGR[:, :full, None]
    if full * per < groups:  # the partial last stored group
        out_PGR2[:, full * per :, :, 0] = s_PGR[:, full:]


def _packed_linear(
    x_nC: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    fmt: ExpertFormat,
    pieces: int,
    scale_zeros: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x @ dequant(q)^T`` [n, N] in x's dtype through torch's packed CPU matmul with bf16 activations, or None
    where that matmul cannot take the projection (then the caller dequantizes). int4: ``scale_zeros``, the
    scales already in torch's layout (``fill_int4pack_scales``, as a slot pool keeps them), else built here."""
    N, C = q.shape[0], x_nC.shape[1]
    if fmt.kind == "int8":
        if C % INT8PACK_COLS:
            return None
        # The fp32 row scale is applied after the bf16 matmul (on its bf16 output), not rounded to bf16.
        y = torch._weight_int8pack_mm(x_nC.to(torch.bfloat16), q, torch.ones(N, dtype=torch.bfloat16))
        return y.to(x_nC.dtype).mul_(scale.view(1, N))
    if scale_zeros is None:
        shape = int4pack_scales_shape(fmt, N, C, pieces)
        if shape is None:
            return None
        scale_zeros = torch.zeros(*shape, 2, dtype=torch.bfloat16)
        fill_int4pack_scales(scale, fmt, C, scale_zeros)
    pieces, group, rows = scale_zeros.shape[0], C // scale_zeros.shape[1], scale_zeros.shape[2]
    x_bf16 = x_nC.to(torch.bfloat16)
    if pieces == 1:
        return torch._weight_int4pack_mm_for_cpu(x_bf16, q, group, scale_zeros[0]).to(x_nC.dtype)
    outs = [torch._weight_int4pack_mm_for_cpu(x_bf16, q[p * rows : (p + 1) * rows], group, scale_zeros[p])
            for p in range(pieces)]  # fmt: skip
    return torch.cat(outs, dim=1).to(x_nC.dtype)


def slot_halves(
    pool: QuantizedPool,
    x_TD: torch.Tensor,
    *,
    gate: Gate | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    packed: bool = True,
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """A slot's MLP for ``quantized_experts_forward`` in two halves, for rows like ``x_TD`` (its device and
    dtype): the gate/up projection through the gate (``QuantizedPool.slot_hidden``), then the down projection
    (``slot_output``): ``hidden(s, x_nD, bias_2I=None) -> [n, I]``, ``output(s, a_nI, bias_D=None) -> [n, D]``.
    A slot serving at most PACKED_MAX_ROWS rows of an int8 / int4 pool on the CPU (fp32 or bf16
    activations) goes through torch's packed matmuls; every other, and every slot with ``packed=False``, is
    dequantized into ``scratch`` (``gate_up [2I, D]``, ``down [D, I]`` in x's dtype; allocated here when not given).
    One token's layer can so compute an expert's first half as soon as its gate/up bytes are in (the engine's
    early replies) and the row is the same to the last bit."""
    if scratch is None:
        scratch = (
            torch.empty(2 * pool.inter, pool.hidden, dtype=x_TD.dtype, device=x_TD.device),
            torch.empty(pool.hidden, pool.inter, dtype=x_TD.dtype, device=x_TD.device),
        )
    mlp_gate = gate or silu_and_mul
    packable = (packed and pool.fmt.kind in PACKED_KINDS and x_TD.device.type == "cpu"
                and x_TD.dtype in (torch.float32, torch.bfloat16))  # fmt: skip

    def hidden(s: int, x_nD: torch.Tensor, bias_2I: torch.Tensor | None = None) -> torch.Tensor:
        return pool.slot_hidden(s, x_nD, mlp_gate, bias_2I, scratch[0], packable and x_nD.shape[0] <= PACKED_MAX_ROWS)

    def output(s: int, a_nI: torch.Tensor, bias_D: torch.Tensor | None = None) -> torch.Tensor:
        return pool.slot_output(s, a_nI, bias_D, scratch[1], packable and a_nI.shape[0] <= PACKED_MAX_ROWS)

    return hidden, output


def quantized_experts_forward(
    x_TD: torch.Tensor,
    pool: QuantizedPool,
    weights_TK: torch.Tensor | None,
    slot_ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: Biases = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    packed: bool = True,
) -> torch.Tensor:
    """``experts_forward`` over a quantized pool (same contract: slot -1 contributes 0, sum over k in k order).

    A slot serving at most PACKED_MAX_ROWS rows of an int8 / int4 pool on the CPU (fp32 or bf16 activations) goes
    through torch's packed matmuls with bf16 activations (``slot_halves``): within the stated bf16
    tolerance of the exact path, not bit-identical. Every other slot, and every slot with ``packed=False``, is
    dequantized into ``scratch`` (``gate_up [2I, D]``, ``down [D, I]`` in x's dtype; allocated here when not given)
    and computed as the exact path computes: bit-identical to transformers' experts on the dequantized weights.
    ``biases``: per slot, as ``experts_forward`` takes them. ``weights_TK`` None: the pairs' rows before their
    routing weights, ``[T * K, D]`` (``kernels.experts_rows``; ``kernels.weighted_sum`` sums them)."""
    T, D = x_TD.shape
    K = slot_ids_TK.shape[1]
    S = pool.gate_up_q.shape[0]
    if D != pool.hidden:
        raise ValueError(f"activations have {D} features, the quantized experts expect {pool.hidden}")
    hidden, output = slot_halves(pool, x_TD, gate=gate, scratch=scratch, packed=packed)

    def slot_mlp(s: int, x_nD: torch.Tensor) -> torch.Tensor:
        bias_2I, bias_D = _slot_biases(biases, s)
        return output(s, hidden(s, x_nD, bias_2I), bias_D)

    if T == 1:
        # One host sync: the slot ids pick the weights (as the exact path's pair loop).
        rows = [slot_mlp(s, x_TD) if 0 <= s < S else x_TD.new_zeros(1, D) for s in slot_ids_TK.reshape(-1).tolist()]
        return _weight_and_sum(torch.cat(rows), weights_TK, x_TD.dtype)
    order_V, _, counts = _sorted_by_slot(slot_ids_TK, S)
    x_VD = x_TD.index_select(0, order_V // K)
    outs, start = [], 0
    for s, n in enumerate(counts):
        if n:
            outs.append(slot_mlp(s, x_VD[start : start + n]))
            start += n
    y_VD = torch.cat(outs) if outs else x_VD.new_zeros(0, D)
    return _weight_and_sum(_unsort(y_VD, order_V, T * K), weights_TK, x_TD.dtype)
