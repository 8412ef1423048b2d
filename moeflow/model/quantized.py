"""Checkpoints whose experts are stored quantized (written by `moeflow quantize`; layout: docs/quantization.md).

config.json names the format under `moeflow_quantization` ({"expert_dtype": "int4", "group_size": 128,
"source_dtype": "float32", "version": 2}); each expert weight keeps its name and holds the quantized tensor
(`...experts.<e>.<proj>.weight`, int8 or packed uint8; `moeflow.model.checkpoint` indexes it with the
format's packing), and its scale sits beside it as `...experts.<e>.<proj>.weight_scale`. A family whose
checkpoints hold a layer's experts in one fused tensor (gpt-oss, granitemoe, ...) is stored per expert under
the fused name and the expert's index (`...experts.gate_up_proj.<e>`, `stored_expert_source`). Stored
weights are always [out, in] (the slot's layout), whatever the family's: transposed families included.
`expert_quantization` finds the scales, checks them against the format, and refuses a folder that lacks
any of them.

A DeepSeek-V3-style FP8 checkpoint (config.json `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128]}) is read the same way: its expert weights are float8_e4m3fn, each with a
per-block `weight_scale_inv` beside it (`moeflow.kernels.quant`'s fp8 format); its dense FP8 weights are
dequantized as they load (`moeflow.model.loading`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.errors import CheckpointError
from moeflow.kernels.quant import INT4_GROUP_SIZES, QUANT_KINDS, ExpertFormat, dequantize, int4pack_scales_nbytes

if TYPE_CHECKING:  # moeflow.model.checkpoint imports this module to parse a quantized folder
    from moeflow.model.checkpoint import Checkpoint, ExpertKey, TensorSpan
    from moeflow.model.families import ExpertSource, Family

CONFIG_KEY = "moeflow_quantization"
FORMAT_VERSION = 2  # 2: int4 rows packed for torch's CPU int4 matmul, bf16 scales (1: column halves, fp16 scales)
READABLE_VERSIONS = (1, 2)  # int8 is the same in both; a version 1 int4 folder is refused (quantize again)
SCALE_SUFFIX = "_scale"  # `<weight name>_scale`
STORED_KINDS = ("int8", "int4")  # what `moeflow quantize` writes and a folder may declare
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FUSED_SLICE = re.compile(r"^(?P<fused>.+)\.(?P<expert>\d+)$")  # `<fused experts tensor name>.<e>`


def fused_slice_name(fused_name: str, expert: int) -> str:
    """The name `moeflow quantize` stores expert `expert` of a fused [E, ...] checkpoint tensor under."""
    return f"{fused_name}.{expert}"


def stored_expert_source(family: Family, name: str) -> ExpertSource | None:
    """What tensor `name` of a `moeflow quantize` folder holds of an expert: a per-expert name as the family's
    checkpoints spell it, or `fused_slice_name` (one expert of a family whose checkpoints fuse a layer's experts).
    None for every other tensor."""
    source = family.expert_source(name)
    if source is not None:
        return source
    m = _FUSED_SLICE.match(name)
    fused = family.expert_source(m["fused"]) if m else None
    if fused is None or fused.expert is not None:
        return None
    return dataclasses.replace(fused, expert=int(m["expert"]))


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalePiece:
    """The scale of one stored expert piece: it fills rows [row, row + rows) of the slot's `param` scales."""

    span: TensorSpan
    param: str  # "gate_up" or "down"
    row: int


@dataclass(frozen=True, kw_only=True)
class ExpertQuantization:
    """A quantized checkpoint's format, its experts' dtype before quantization, and every expert's scales."""

    fmt: ExpertFormat
    source_dtype: torch.dtype
    scales: dict[ExpertKey, tuple[ScalePiece, ...]]


def _supported() -> str:
    return (f"supported: int8, int4 with group size {' / '.join(map(str, INT4_GROUP_SIZES))} (`moeflow quantize`), "
            "block-wise fp8 e4m3 (DeepSeek-V3's quantization_config) and mxfp4 experts (gpt-oss's)")  # fmt: skip


FP8_SCALE_SUFFIX = "_scale_inv"
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"  # gpt-oss: `<experts>.gate_up_proj_blocks` / `..._scales`


def _again(fmt: ExpertFormat) -> str:
    return "download or convert the checkpoint again" if fmt.kind in ("fp8", "mxfp4") else "quantize the model again"


def scale_suffix(fmt: ExpertFormat) -> str:
    """The name of a weight's scale: `<weight name><suffix>` (DeepSeek's FP8 keeps its own `_scale_inv`)."""
    return {"fp8": FP8_SCALE_SUFFIX, "mxfp4": MXFP4_SCALES}.get(fmt.kind, SCALE_SUFFIX)


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, *, name: str) -> torch.Tensor:
    """A dense block-FP8 weight in fp32, its block size read from the scale grid (as transformers reads it)."""
    rows, cols = q.shape
    srows, scols = scale_inv.shape
    if q.dtype != torch.float8_e4m3fn or rows % srows or cols % scols:
        raise CheckpointError(
            f"{name} is {q.dtype} {tuple(q.shape)} with a {tuple(scale_inv.shape)} weight_scale_inv; moeflow reads "
            "float8_e4m3fn weights whose scale grid divides them into whole blocks. The checkpoint is corrupt"
        )
    fmt = ExpertFormat(kind="fp8", block=(rows // srows, cols // scols))
    return dequantize(q, scale_inv.to(torch.float32), fmt)


def _fp8_format(spec: object) -> ExpertFormat:
    """transformers' quantization_config of a pre-quantized checkpoint: only block-wise e4m3 FP8 is read."""
    method = spec.get("quant_method") if isinstance(spec, dict) else None
    if method == "mxfp4":
        return ExpertFormat(kind="mxfp4")
    if method != "fp8":
        raise CheckpointError(
            f"config.json's quantization_config uses quant_method {method!r}, which moeflow does not read; "
            f"{_supported()}. Use a full-precision copy of the model (moeflow quantize can shrink its experts)"
        )
    block = spec.get("weight_block_size")
    if spec.get("fmt", "e4m3") != "e4m3" or not (isinstance(block, list) and len(block) == 2):
        raise CheckpointError(
            f"fp8 checkpoint with fmt {spec.get('fmt')!r} and weight_block_size {block!r}; moeflow reads block-wise "
            f"e4m3 (weight_block_size [rows, columns]), {_supported()}"
        )
    return ExpertFormat(kind="fp8", block=(int(block[0]), int(block[1])))


def declared_format(config: dict) -> ExpertFormat | None:
    """The expert format config.json declares, or None for a full-precision checkpoint."""
    if config.get("quantization_config") is not None:
        return _fp8_format(config["quantization_config"])
    spec = config.get(CONFIG_KEY)
    if spec is None:
        return None
    if isinstance(spec, dict) and spec.get("version") == 1 and spec.get("expert_dtype") == "int4":
        raise CheckpointError(
            f"config.json's {CONFIG_KEY} is {spec!r}: int4 experts of version 1 pack their nibbles by column halves "
            f"with fp16 scales; this moeflow reads version {FORMAT_VERSION} (rows packed as torch's CPU int4 matmul "
            "takes them, bf16 scales). Quantize the full-precision model again with `moeflow quantize`"
        )
    if not isinstance(spec, dict) or spec.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"config.json's {CONFIG_KEY} is {spec!r}; this moeflow reads version {FORMAT_VERSION} "
            f"({{'expert_dtype': ..., 'group_size': ..., 'version': {FORMAT_VERSION}}}), {_supported()}. "
            "Quantize the full-precision model again with `moeflow quantize`"
        )
    kind = spec.get("expert_dtype")
    if kind not in STORED_KINDS:
        raise CheckpointError(
            f"quantized expert dtype {kind!r} in config.json is not supported; {_supported()} "
            f"(held in memory only: {', '.join(k for k in QUANT_KINDS if k not in STORED_KINDS)})"
        )
    try:
        return ExpertFormat(kind=kind, group_size=int(spec.get("group_size") or 0))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json's {CONFIG_KEY}: {e}; {_supported()}") from None


def expert_quantization(ckpt: Checkpoint) -> ExpertQuantization | None:
    """Index and check a quantized checkpoint's experts and their scales (None for a full-precision one).

    Every stored piece of every expert needs its scale, of the format's dtype and shape; a missing or
    malformed one is a CheckpointError naming the tensor (a quantized weight without its scale cannot be read)."""
    fmt = declared_format(ckpt.config)
    if fmt is None:
        return None
    if fmt.kind in ("fp8", "mxfp4"):  # the dtype the model was trained in, as transformers reads it
        source_dtype = _DTYPE_NAMES.get(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype"), torch.bfloat16)
    else:
        spec = ckpt.config[CONFIG_KEY]
        source_dtype = _DTYPE_NAMES.get(spec.get("source_dtype", "float32"))
        if source_dtype is None:
            raise CheckpointError(
                f"config.json's {CONFIG_KEY} names source_dtype {spec['source_dtype']!r}; "
                f"one of {', '.join(_DTYPE_NAMES)} is expected: quantize the model again"
            )
    suffix = scale_suffix(fmt)
    found = _mxfp4_scale_spans(ckpt) if fmt.kind == "mxfp4" else _scale_spans(ckpt, suffix)
    scales = {}
    for key, loc in ckpt.experts.items():
        pieces = []
        for piece in loc.pieces:
            what = f"the {piece.param} rows {piece.row}..{piece.row + piece.rows} of expert {key[1]} in layer {key[0]}"
            if piece.transposed:  # `moeflow quantize` stores [out, in] (`_split_experts`); fp8 is read as shipped
                raise CheckpointError(
                    f"{ckpt.family.model_type} stores its experts transposed; moeflow reads {fmt.name} experts as "
                    "[out, in] weights only. Load a full-precision folder of the model with --expert-dtype int8 or "
                    "int4, or store it with `moeflow quantize`"
                )
            scale = found.pop((key, piece.param, piece.row // fmt.scale_rows), None)
            if scale is None:
                raise CheckpointError(
                    f"the scale of {what} ({_scale_hint(fmt, piece.param, suffix)}) is missing: "
                    f"config.json declares {fmt.name} experts, and a quantized weight cannot be read without its "
                    f"scale. The folder is incomplete; {_again(fmt)}"
                )
            try:
                shape = fmt.scale_shape(piece.rows, piece.cols * fmt.packing)
            except ValueError as e:
                raise CheckpointError(f"{what}: {e}; this checkpoint's experts cannot be read block by block") from None
            if scale.dtype != fmt.scale_dtype or tuple(scale.shape) != shape:
                raise CheckpointError(
                    f"the scale of {what} is {scale.dtype} {tuple(scale.shape)}; a {fmt.name} expert's scale is "
                    f"{fmt.scale_dtype} {shape} (docs/quantization.md). The folder is corrupt; {_again(fmt)}"
                )
            pieces.append(ScalePiece(span=scale, param=piece.param, row=piece.row // fmt.scale_rows))
        scales[key] = tuple(pieces)
    return ExpertQuantization(fmt=fmt, source_dtype=source_dtype, scales=scales)


def _scale_spans(ckpt: Checkpoint, suffix: str) -> dict[tuple[ExpertKey, str, int], TensorSpan]:
    """Every expert scale by (expert, slot parameter, first scale row): a scale sits among the non-expert
    tensors under its weight's name + `suffix`, and the family says which expert rows that weight fills."""
    out = {}
    for name, span in ckpt.tensors.items():
        if not name.endswith(suffix):
            continue
        source = stored_expert_source(ckpt.family, name.removesuffix(suffix))
        if source is None or source.expert is None:
            continue
        param = "gate_up" if source.param == "gate_up_proj" else "down"
        out[((source.layer, source.expert), param, source.part * span.shape[0])] = span
    return out


def _scale_hint(fmt: ExpertFormat, param: str, suffix: str) -> str:
    if fmt.kind == "mxfp4":
        return f"the layer's `...experts.{param}_proj{MXFP4_SCALES}`"
    return f"a `...weight{suffix}` tensor beside its weight"


def _mxfp4_scale_spans(ckpt: Checkpoint) -> dict[tuple[ExpertKey, str, int], TensorSpan]:
    """gpt-oss's fused `<experts>.<param>_scales` [E, rows, cols / 32] (uint8), sliced per expert."""
    from moeflow.model.checkpoint import TensorSpan  # this module is imported by moeflow.model.checkpoint

    out = {}
    for name, span in ckpt.tensors.items():
        source = ckpt.family.expert_source(name.removesuffix(MXFP4_SCALES)) if name.endswith(MXFP4_SCALES) else None
        if source is None or source.expert is not None or len(span.shape) != 3:
            continue
        n_experts, rows, groups = span.shape
        stride = span.nbytes // n_experts
        param = "gate_up" if source.param == "gate_up_proj" else "down"
        for e in range(n_experts):
            piece = TensorSpan(file=span.file, offset=span.offset + e * stride, nbytes=stride, dtype=span.dtype,
                               shape=(rows, groups))  # fmt: skip
            out[((source.layer, e), param, 0)] = piece
    return out


_COMPUTE_KIND = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_expert_format(
    requested: str, group_size: int, *, stored: ExpertFormat | None, compute: torch.dtype
) -> ExpertFormat | None:
    """The format the slots hold for `--expert-dtype requested` (None: the compute dtype, the exact path).

    A quantized folder is held as stored (auto, or the same dtype); nothing else can be made from its
    quantized bytes. A full-precision one is held at the compute dtype (auto, or the compute dtype's own
    name), cast (bf16/fp16), or quantized as it is read (int8/int4)."""
    if stored is not None:
        same = requested == stored.kind and (stored.kind != "int4" or group_size == stored.group_size)
        if requested == "auto" or same:
            return stored
        asked = f"{requested}{f' --group-size {group_size}' if requested == 'int4' else ''}"
        own = f"{stored.kind}{f' --group-size {stored.group_size}' if stored.kind == 'int4' else ''}"
        raise CheckpointError(
            f"this folder stores its experts as {stored.name}; --expert-dtype {asked} cannot be made from them. "
            f"Use --expert-dtype auto (or {own}), or run `moeflow quantize` on the full-precision model"
        )
    if requested == "auto" or _COMPUTE_KIND.get(compute) == requested:
        return None
    return ExpertFormat(kind=requested, group_size=group_size if requested == "int4" else 0)


def expert_slot_bytes(
    inter: int, hidden: int, fmt: ExpertFormat | None, compute: torch.dtype, *, packed_scales: bool = False
) -> int:
    """Bytes of one slot: what the budget counts per resident expert (``packed_scales``: also its int4 scales
    in torch's matmul layout, as a CPU slot pool keeps them; ``SlotPool``)."""
    if fmt is None:
        return 3 * inter * hidden * compute.itemsize
    extra = int4pack_scales_nbytes(fmt, inter, hidden) if packed_scales else 0
    return fmt.nbytes(2 * inter, hidden) + fmt.nbytes(hidden, inter) + extra
