"""Quantized expert weights: the formats, quantize / dequantize, and the expert MLP over a quantized slot pool.

Shape legend: ``moeflow/__init__.py`` (T tokens, D hidden, I expert intermediate, S slots, K top-k);
here also N rows (output features) and C columns (input features) of one projection, and G groups of
columns sharing a scale. The on-disk layout is documented in ``docs/quantization.md``.

Formats (``ExpertFormat``), per projection weight ``w_NC`` (gate and up are [I, D], down is [D, I]):

- ``int8``: per output channel, symmetric. ``scale_N1`` fp32 = max|w[n]| / 127 (1 for an all-zero row),
  ``q_NC`` int8 = round(w / scale) in [-127, 127]. Dequantized: ``q * scale`` in fp32.
- ``int4``: group-wise along the input columns, symmetric, groups of ``group_size`` columns (the last
  group holds the remainder when ``group_size`` does not divide C). ``scale_NG`` fp16 = max|w[group]| / 7,
  rounded to fp16 first, ``q`` = round(w / scale) in [-8, 7], two's complement nibbles, two per byte:
  byte j of a row holds column j in its low nibble and column j + C/2 in its high one (``q_N(C/2)`` uint8;
  C must be even). Halves, not neighbours: each nibble plane unpacks into a contiguous half-row
  (0.42 vs 0.67 ms for 16384 x 192 with neighbours interleaved, whose unpack writes with stride 2).
  Dequantized: ``q * float(scale)`` in fp32. Symmetric, without zero points: a zero point per group
  would add 2 bytes per group (6.25% more bytes at group 128, past the 1/8-of-fp32 target) for the
  asymmetric range; measured perplexity with the symmetric form is in bench/results/quantized.
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

Expert compute (``quantized_experts_forward``): each slot a (token, k) pair needs is dequantized into
one expert-sized scratch buffer in the compute dtype, then computed with the exact path's arithmetic
(``kernels.cpu``: one ``torch.mm`` per pair at T=1, pairs sorted by slot with one ``torch.mm`` per slot
otherwise), so the result equals, bit for bit, transformers' grouped_mm experts run on the dequantized
weights (tests/kernels/test_kernels_quant.py). Measured on the 2-core AMD EPYC, one thread, x [1, 192],
a 16384 x 192 projection (the I/O-bound model's gate_up), ms: fp32 mm 0.34; int8: dequantize (copy into the
scratch, multiply in place: 0.25) + mm ~0.6, ``torch._weight_int8pack_mm`` with fp32 activations
1.9 (with bf16 activations 0.10, but bf16 activations break the fp32 exactness of the reference
comparison); int4: ``torch._weight_int4pack_mm_for_cpu`` fp32 4.5 (bf16 0.08), nibble unpack + dequantize
+ mm ~2 (bench/quantized.py --kernels). So fp32 activations take the dequantize + mm formulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from moeflow.kernels.cpu import (
    GEMMS,
    Biases,
    Gate,
    _expert_mlp,
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
_INT4_MAX = 7  # scale = max|w| / 7; rounding may reach -8 only through the fp16 scale's rounding
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
            raise ValueError(
                f"int4 group size {self.group_size} is not supported; use one of {INT4_GROUP_SIZES}"
            )
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
        return {"int8": torch.float32, "int4": torch.float16, "fp8": torch.float32, "mxfp4": torch.uint8}.get(self.kind)

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
            if cols % 2:
                raise ValueError(f"int4 packs two columns per byte: a projection with {cols} columns cannot be packed")
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


def quantize(w_NC: torch.Tensor, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w_NC`` (any float dtype) -> (quantized weight, scale or None) in ``fmt`` (module docstring)."""
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
    fmt.weight_shape(rows, cols)  # refuses an odd column count
    g = fmt.group_size
    groups = math.ceil(cols / g)
    padded = torch.nn.functional.pad(w, (0, groups * g - cols)).view(rows, groups, g)
    amax_NG = padded.abs().amax(dim=2)
    if amax_NG.max() / _INT4_MAX > torch.finfo(torch.float16).max:
        raise ValueError("a weight group's scale exceeds the fp16 range; this weight cannot be stored as int4")
    scale_NG = torch.where(amax_NG > 0, amax_NG / _INT4_MAX, torch.ones_like(amax_NG)).to(torch.float16)
    scale_NG = torch.where(scale_NG > 0, scale_NG, torch.ones_like(scale_NG))  # an fp16 underflow: q stays 0
    q = torch.round(padded / scale_NG.float()[:, :, None]).clamp_(-8, 7).view(rows, groups * g)[:, :cols]
    q8 = q.to(torch.int8)
    half = cols // 2
    packed = (q8[:, :half] & 0xF) | ((q8[:, half:] & 0xF) << 4)
    return packed.view(torch.uint8).contiguous(), scale_NG.contiguous()


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: ExpertFormat,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight ``[N, C]`` in ``dtype`` from its stored form (into ``out`` when given, [N, C] contiguous)."""
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
    signed = q.view(torch.int8)
    half = cols // 2
    nibbles = torch.empty_like(signed)
    torch.bitwise_left_shift(signed, 4, out=nibbles).bitwise_right_shift_(4)  # the low nibble, sign extended
    out[:, :half].copy_(nibbles)
    torch.bitwise_right_shift(signed, 4, out=nibbles)  # the high nibble (arithmetic shift keeps the sign)
    out[:, half:].copy_(nibbles)
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
    layout, their scales ``[S, 2I, G]`` / ``[S, D, G]`` (None for bf16/fp16), and the sizes I and D."""

    fmt: ExpertFormat
    gate_up_q: torch.Tensor
    down_q: torch.Tensor
    gate_up_scale: torch.Tensor | None
    down_scale: torch.Tensor | None
    inter: int
    hidden: int

    def dequantize_slot(self, s: int, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor) -> None:
        """Slot ``s``'s weights into the given buffers (the compute dtype)."""
        gu_scale = None if self.gate_up_scale is None else self.gate_up_scale[s]
        d_scale = None if self.down_scale is None else self.down_scale[s]
        dequantize(self.gate_up_q[s], gu_scale, self.fmt, out=gate_up_2ID)
        dequantize(self.down_q[s], d_scale, self.fmt, out=down_DI)


def quantized_experts_forward(
    x_TD: torch.Tensor,
    pool: QuantizedPool,
    weights_TK: torch.Tensor,
    slot_ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: Biases = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``experts_forward`` over a quantized pool (same contract: slot -1 contributes 0, sum over k in k order).

    Each used slot is dequantized once per call into ``scratch`` (``gate_up [2I, D]``, ``down [D, I]`` in x's
    dtype; allocated here when not given), then computed as the exact path computes: bit-identical to
    transformers' experts on the dequantized weights. ``biases``: per slot, as ``experts_forward`` takes them."""
    T, D = x_TD.shape
    K = slot_ids_TK.shape[1]
    S = pool.gate_up_q.shape[0]
    if D != pool.hidden:
        raise ValueError(f"activations have {D} features, the quantized experts expect {pool.hidden}")
    if scratch is None:
        scratch = (
            torch.empty(2 * pool.inter, D, dtype=x_TD.dtype, device=x_TD.device),
            torch.empty(D, pool.inter, dtype=x_TD.dtype, device=x_TD.device),
        )
    gate_up_2ID, down_DI = scratch
    mlp_gate = gate or silu_and_mul
    if T == 1:
        rows = []
        # One host sync: the slot ids pick the weights to dequantize (as the exact path's pair loop).
        for s in slot_ids_TK.reshape(-1).tolist():
            if 0 <= s < S:
                pool.dequantize_slot(s, gate_up_2ID, down_DI)
                rows.append(_expert_mlp(x_TD, gate_up_2ID, down_DI, GEMMS["mm"], mlp_gate, *_slot_biases(biases, s)))
            else:
                rows.append(x_TD.new_zeros(1, D))
        return _weight_and_sum(torch.cat(rows), weights_TK, x_TD.dtype)
    order_V, _, counts = _sorted_by_slot(slot_ids_TK, S)
    x_VD = x_TD.index_select(0, order_V // K)
    outs, start = [], 0
    for s, n in enumerate(counts):
        if n:
            pool.dequantize_slot(s, gate_up_2ID, down_DI)
            mlp_args = (gate_up_2ID, down_DI, GEMMS["mm"], mlp_gate, *_slot_biases(biases, s))
            outs.append(_expert_mlp(x_VD[start : start + n], *mlp_args))
            start += n
    y_VD = torch.cat(outs) if outs else x_VD.new_zeros(0, D)
    return _weight_and_sum(_unsort(y_VD, order_V, T * K), weights_TK, x_TD.dtype)
