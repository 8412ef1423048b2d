"""Checkpoints whose experts are stored quantized (written by `moeflow quantize`; layout: docs/quantization.md).

config.json names the format under `moeflow_quantization` ({"expert_dtype": "int4", "group_size": 128,
"source_dtype": "float32", "version": 1}); each expert weight keeps its name and holds the quantized tensor
(`...experts.<e>.<proj>.weight`, int8 or packed uint8; `moeflow.model.checkpoint` indexes it with the
format's packing), and its scale sits beside it as `...experts.<e>.<proj>.weight_scale`.
`expert_quantization` finds the scales, checks them against the format, and refuses a folder that lacks
any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.errors import CheckpointError
from moeflow.kernels.quant import INT4_GROUP_SIZES, QUANT_KINDS, ExpertFormat

if TYPE_CHECKING:  # moeflow.model.checkpoint imports this module to parse a quantized folder
    from moeflow.model.checkpoint import Checkpoint, ExpertKey, TensorSpan

CONFIG_KEY = "moeflow_quantization"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"  # `<weight name>_scale`
STORED_KINDS = ("int8", "int4")  # what `moeflow quantize` writes and a folder may declare
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    return f"supported: int8, int4 with group size {' / '.join(map(str, INT4_GROUP_SIZES))}"


def declared_format(config: dict) -> ExpertFormat | None:
    """The expert format config.json declares, or None for a full-precision checkpoint."""
    spec = config.get(CONFIG_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("version") != FORMAT_VERSION:
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
    spec = ckpt.config[CONFIG_KEY]
    source_dtype = _DTYPE_NAMES.get(spec.get("source_dtype", "float32"))
    if source_dtype is None:
        raise CheckpointError(f"config.json's {CONFIG_KEY} names source_dtype {spec['source_dtype']!r}; "
                              f"one of {', '.join(_DTYPE_NAMES)} is expected: quantize the model again")  # fmt: skip
    found = _scale_spans(ckpt)
    scales = {}
    for key, loc in ckpt.experts.items():
        pieces = []
        for piece in loc.pieces:
            what = f"the {piece.param} rows {piece.row}..{piece.row + piece.rows} of expert {key[1]} in layer {key[0]}"
            if piece.transposed:
                raise CheckpointError(
                    f"{ckpt.family.model_type} stores its experts transposed; moeflow's int8/int4 layout is for "
                    "[out, in] weights only. Load the full-precision folder with --expert-dtype int8 or int4 instead"
                )
            scale = found.pop((key, piece.param, piece.row), None)
            if scale is None:
                raise CheckpointError(
                    f"the scale of {what} (a `...weight{SCALE_SUFFIX}` tensor beside its weight) is missing: "
                    f"config.json declares {fmt.name} experts, and a quantized weight cannot be read without its "
                    "scale. The folder is incomplete; quantize the model again"
                )
            shape = fmt.scale_shape(piece.rows, piece.cols * (2 if fmt.kind == "int4" else 1))
            if scale.dtype != fmt.scale_dtype or tuple(scale.shape) != shape:
                raise CheckpointError(
                    f"the scale of {what} is {scale.dtype} {tuple(scale.shape)}; a {fmt.name} expert's scale is "
                    f"{fmt.scale_dtype} {shape} (docs/quantization.md). The folder is corrupt; quantize the model again"
                )
            pieces.append(ScalePiece(span=scale, param=piece.param, row=piece.row))
        scales[key] = tuple(pieces)
    return ExpertQuantization(fmt=fmt, source_dtype=source_dtype, scales=scales)


def _scale_spans(ckpt: Checkpoint) -> dict[tuple[ExpertKey, str, int], TensorSpan]:
    """Every expert scale by (expert, slot parameter, first row): a scale sits among the non-expert tensors
    under its weight's name + `_scale`, and the family says which expert rows that weight fills."""
    out = {}
    for name, span in ckpt.tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        source = ckpt.family.expert_source(name.removesuffix(SCALE_SUFFIX))
        if source is None or source.expert is None:
            continue
        param = "gate_up" if source.param == "gate_up_proj" else "down"
        out[((source.layer, source.expert), param, source.part * span.shape[0])] = span
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


def expert_slot_bytes(inter: int, hidden: int, fmt: ExpertFormat | None, compute: torch.dtype) -> int:
    """Bytes of one slot: what the budget counts per resident expert."""
    if fmt is None:
        return 3 * inter * hidden * compute.itemsize
    return fmt.nbytes(2 * inter, hidden) + fmt.nbytes(hidden, inter)
