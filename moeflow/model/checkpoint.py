"""Read a Hugging Face checkpoint folder without reading its experts.

The safetensors headers are parsed here (8-byte little-endian length, then JSON), so every expert
tensor is located as (file, byte offset, byte length, dtype, shape) and read on demand by a store.
Non-expert tensors are read one by one.

Nothing outside the model folder is read: every file named by the folder (shards listed in
`model.safetensors.index.json`, symlinks) must resolve inside it (or, for a Hugging Face hub snapshot,
inside its repository's `blobs/`) and be a regular file. Every header is validated as the safetensors
library validates it (`_read_header`), so a corrupt file is refused at load, never read as wrong weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.errors import CheckpointError
from moeflow.kernels.quant import ExpertFormat
from moeflow.model.families import ExpertSource, Family, family_for
from moeflow.model.quantized import MXFP4_BLOCKS, STORED_KINDS, declared_format, stored_expert_source

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,  # DeepSeek-V3's block-wise FP8 (moeflow.model.quantized)
    "F8_E5M2": torch.float8_e5m2,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header

log = logging.getLogger(__name__)

# An expert is named by (MoE layer index in the model, expert index within that layer).
ExpertKey = tuple[int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpan:
    """Where one tensor (or one expert's slice of a fused tensor) lies on disk."""

    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertPiece:
    """One stored tensor of an expert and where it lands in the expert's slot.

    A slot holds transformers' non-transposed layout: `gate_up` [2I, D] (gate rows then up rows, or
    interleaved as the family keeps them in memory) and `down` [D, I]. The piece fills rows
    [row, row + rows) of `param`; `transposed`: the span stores those rows as columns (an
    `is_transposed` family's [D, 2I] / [I, D]).
    """

    span: TensorSpan
    param: str  # "gate_up" or "down"
    row: int
    transposed: bool

    @property
    def rows(self) -> int:
        return self.span.shape[1] if self.transposed else self.span.shape[0]

    @property
    def cols(self) -> int:
        return self.span.shape[0] if self.transposed else self.span.shape[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertLocation:
    """Where one expert's weights lie: its pieces, and its size (I intermediate, D hidden)."""

    pieces: tuple[ExpertPiece, ...]
    inter: int
    hidden: int

    @property
    def spans(self) -> tuple[TensorSpan, ...]:
        return tuple(p.span for p in self.pieces)

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0].span.dtype


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    path: Path
    config: dict
    family: Family
    tensors: dict[str, TensorSpan]  # every non-expert tensor, by on-disk name
    experts: dict[ExpertKey, ExpertLocation]
    num_experts: dict[int, int]  # MoE layer index -> number of routed experts

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.num_experts)

    @property
    def expert_bytes_on_disk(self) -> int:
        return sum(s.nbytes for loc in self.experts.values() for s in loc.spans)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one non-expert tensor into host memory (a copy, never an mmap view); warn if it holds NaN/Inf."""
        span = self.tensors[name]
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            raw = f.read(span.nbytes)
        if len(raw) != span.nbytes:
            raise CheckpointError(f"{span.file.name} ended while reading {name}; the shard is truncated")
        tensor = torch.frombuffer(bytearray(raw), dtype=span.dtype).reshape(span.shape)
        fp8 = tensor.is_floating_point() and tensor.element_size() == 1  # torch has no isfinite for float8
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float() if fp8 else tensor).all()):
            log.warning(
                "%s in %s holds NaN or Inf values: the model's output will not be numbers. The checkpoint is "
                "corrupt; download or convert it again", name, span.file.name
            )
        return tensor


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Parse config and every shard header; validate sizes; index the experts. Reads no weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"model folder {str(root)!r} does not exist or is not a folder; give the path of a Hugging Face model "
            "folder (config.json and *.safetensors): moeflow.load(PATH) in Python, --model PATH on the command "
            "line; leave it out for the shipped default model"
        )
    _check_folder_entries(root)
    config = _read_config(root)
    _check_config_counts(root / "config.json", config)
    family = family_for(root, config)
    shard_tensors: dict[str, TensorSpan] = {}
    for shard in _shard_files(root):
        for name, span in _read_header(shard).items():
            if name in shard_tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice, in {shard_tensors[name].file.name} and {shard.name}; "
                    "the shards belong to different checkpoints: download or convert the model again"
                )
            shard_tensors[name] = span
    # A folder written by `moeflow quantize` stores its experts quantized (moeflow.model.quantized).
    tensors, experts = _split_experts(shard_tensors, family, declared_format(config))
    num_experts: dict[int, int] = {}
    for layer, expert in experts:
        num_experts[layer] = max(num_experts.get(layer, 0), expert + 1)
    for layer, n in num_experts.items():
        missing = [e for e in range(n) if (layer, e) not in experts]
        if missing:
            raise CheckpointError(f"layer {layer} lacks experts {missing[:8]}; the checkpoint is incomplete")
    if not experts:
        raise CheckpointError(
            f"no expert tensors found in {root}; a {family.model_type} checkpoint names them as transformers' "
            f"conversion mapping for {family.model_type} says (e.g. '...experts.0.gate_proj.weight')"
        )
    _check_moe_config(root / "config.json", config, num_experts)
    return Checkpoint(
        path=root, config=config, family=family, tensors=tensors, experts=experts, num_experts=num_experts
    )


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where the files of model folder `root` may lie once symlinks are resolved: the folder itself, and for
    a Hugging Face hub snapshot (`models--org--name/snapshots/<revision>`) the repository's `blobs/`, where the
    hub's own symlinks point."""
    roots = [root.resolve()]
    if root.absolute().parent.name == "snapshots":
        roots.append(root.absolute().parent.parent.resolve() / "blobs")
    return tuple(roots)


def model_file(root: Path, name: str, *, named_by: str) -> Path | None:
    """`root / name` when it is a regular file inside the model folder; None when it does not exist.

    `name` may be relative (as an index lists shards) or a path below `root`. A name or symlink that leads
    outside the folder, or a FIFO, device, socket or folder where a file is expected, is a CheckpointError:
    a model folder must not make moeflow read (or hang on) anything but its own files. `named_by` says where
    the name came from, for the message.
    """
    path = root / name
    resolved = path.resolve()
    if not any(resolved.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(
            f"{named_by} names {str(name)!r}, which resolves to {str(resolved)!r}, outside the model folder "
            f"{str(root)!r}; moeflow reads only files inside the model folder. Copy the file into the folder "
            "(and fix the name), or download the model again"
        )
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"{named_by} names {str(name)!r}, which is {_file_kind(mode)}, not a regular file; moeflow reads only "
            "regular files from a model folder. Replace it with the real file (download the model again)"
        )
    return path


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_folder_entries(root: Path) -> None:
    """Every file at the top of the model folder (what transformers may open: config, tokenizer, generation
    config) is a regular file inside the folder; sub-folders are checked where their files are read."""
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            continue
        if entry.is_symlink() and entry.resolve().is_dir():
            resolved = entry.resolve()
            if not any(resolved.is_relative_to(r) for r in _allowed_roots(root)):
                raise CheckpointError(
                    f"the model folder {str(root)!r} holds {entry.name!r}, a symlink to {str(resolved)!r}, "
                    "outside the folder; moeflow reads only files inside the model folder. Copy that folder in"
                )
            continue
        model_file(root, entry.name, named_by=f"the model folder {str(root)!r}")


def _read_config(root: Path) -> dict:
    cfg_path = model_file(root, "config.json", named_by=f"the model folder {str(root)!r}")
    if cfg_path is None:
        raise CheckpointError(f"{root} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save or re-download the model") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return config


# Sizes and counts a config.json may set that must be positive integers when present: transformers would build
# a model from 0, -1 or 2.5 and fail mid-forward (a division by zero, a negative dimension, top-k out of range).
_POSITIVE_INTS = ("num_experts_per_tok", "num_local_experts", "num_experts", "n_routed_experts", "hidden_size",
                  "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "decoder_sparse_step", "n_group",
                  "topk_group")


def _bad_config(cfg_path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{cfg_path}: {what}. Fix config.json (or download the model again)")


def _check_config_counts(cfg_path: Path, config: dict) -> None:
    """Before any model is built from config.json: its sizes and counts are positive integers."""
    for key in _POSITIVE_INTS:
        value = config.get(key)
        if key in config and (value is not None or key == "num_experts_per_tok"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad_config(cfg_path, f"{key} is {value!r}; it must be a positive integer")


def _check_moe_config(cfg_path: Path, config: dict, num_experts: dict[int, int]) -> None:
    """The MoE settings of config.json make sense for the experts on disk (a clear error, not a traceback inside
    the model's forward): top-k routing picks at most the experts a layer has, and DeepSeek-style grouped
    routing splits them into equal groups of at least two."""

    def bad(what: str) -> CheckpointError:
        return _bad_config(cfg_path, what)

    experts = min(num_experts.values())
    top_k = config.get("num_experts_per_tok")
    if top_k is not None and top_k > experts:
        raise bad(f"num_experts_per_tok is {top_k} but the checkpoint's MoE layers have {experts} experts; top-k "
                  f"routing picks at most {experts}")
    groups, top_groups = config.get("n_group"), config.get("topk_group")
    if groups is not None and config.get("model_type") in ("deepseek_v3", "deepseek_v2", "glm4_moe"):
        if experts % groups or experts // groups < 2:
            raise bad(f"n_group is {groups}: the {experts} routed experts must split into n_group equal groups of "
                      "at least 2")
        if top_groups is not None and top_groups > groups:
            raise bad(f"topk_group is {top_groups} but there are only n_group = {groups} groups")
        if top_groups is not None and top_k is not None and top_k > top_groups * (experts // groups):
            raise bad(f"num_experts_per_tok is {top_k} but the {top_groups} chosen group(s) of {experts // groups} "
                      f"experts hold only {top_groups * (experts // groups)}")


def _shard_files(root: Path) -> list[Path]:
    index = model_file(root, "model.safetensors.index.json", named_by=f"the model folder {str(root)!r}")
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted({str(name) for name in weight_map.values() if isinstance(name, str)})
            if len(names) != len(set(weight_map.values())):
                raise TypeError("every shard name must be a string")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-save the checkpoint") from e
        shards = {name: model_file(root, name, named_by=index.name) for name in names}
        missing = [name for name, shard in shards.items() if shard is None]
        if missing:
            raise CheckpointError(
                f"shard(s) {', '.join(missing)} listed in {index.name} are missing from {root}; "
                "copy or download them again"
            )
        return sorted(shard for shard in shards.values() if shard is not None)
    shards = [model_file(root, p.name, named_by=f"the model folder {str(root)!r}") for p in root.glob("*.safetensors")]
    if not shards:
        raise CheckpointError(f"{root} has no *.safetensors files; moeflow reads safetensors checkpoints only")
    return sorted(shard for shard in shards if shard is not None)


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (not a bool, not a float such as 4.0): what safetensors accepts as a
    shape entry or byte offset."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _read_header(shard: Path) -> dict[str, TensorSpan]:
    """Every tensor of one shard, after the checks the safetensors library makes when it opens a file.

    The header length is within the file and the library's limit; the header is a JSON object whose
    `__metadata__` maps strings to strings and whose every other entry has a known dtype, a shape of
    non-negative integers and integer `data_offsets` [start, end] with start <= end; the byte length
    end - start is exactly numel * itemsize; and the tensors, ordered by offset, cover the data section
    exactly, one after the other: no overlap (two tensors sharing bytes), no gap, nothing past the end.
    """

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(
            f"{shard} has a corrupt safetensors header: {what}. The file is damaged or was written by a broken "
            "converter; download the checkpoint again (or convert it again with safetensors' save_file)"
        )

    size = shard.stat().st_size
    with open(shard, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shard} is truncated ({size} bytes); copy or download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER:
            raise corrupt(f"its header claims {header_len} bytes, over safetensors' limit of {_MAX_HEADER}")
        if header_len > size - 8:
            raise corrupt(f"its header claims {header_len} bytes but the file has {size}")
        raw = f.read(header_len)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(f"its header is not a JSON object ({e})") from e
    base = 8 + header_len
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("its __metadata__ must map strings to strings")
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise corrupt(f"tensor {name!r} lacks its dtype, shape or data_offsets")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise corrupt(f"tensor {name!r} has dtype {info['dtype']!r}, which moeflow does not read "
                          f"(known: {', '.join(_DTYPES)})")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise corrupt(f"tensor {name!r} has data_offsets {offsets!r}; they must be two non-negative integers "
                          "[start, end]")
        start, end = offsets
        if end < start:
            raise corrupt(f"tensor {name!r} has data_offsets [{start}, {end}], which end before they start")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes:
            raise corrupt(f"tensor {name!r} ({info['dtype']} {shape}) needs {nbytes} bytes but its data_offsets "
                          f"[{start}, {end}] hold {end - start}")
        entries.append((start, end, name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    for (_, end_a, a, _, _), (start, end, name, _, _) in zip(entries, entries[1:]):
        if start < end_a:
            raise corrupt(f"tensors {a!r} and {name!r} share data bytes [{start}, {min(end, end_a)}): two tensors "
                          "may not overlap (one would be read as the other)")
    out: dict[str, TensorSpan] = {}
    covered, previous = 0, None
    for start, end, name, dtype, shape in entries:
        if start != covered:
            where = f"tensor {previous!r} ends at byte {covered}" if previous else "the data section starts at 0"
            raise corrupt(f"tensor {name!r} starts at data byte {start} but {where}: the tensors leave a gap")
        out[name] = TensorSpan(file=shard, offset=base + start, nbytes=end - start, dtype=dtype, shape=shape)
        covered, previous = end, name
    if base + covered > size:
        raise CheckpointError(
            f"{shard} is truncated: its header needs {base + covered} bytes but the file has {size}; "
            "copy or download it again"
        )
    if base + covered < size:
        raise corrupt(f"its tensors end at byte {base + covered} but the file has {size} bytes")
    return out


def _split_experts(
    shard_tensors: dict[str, TensorSpan], family: Family, fmt: ExpertFormat | None = None
) -> tuple[dict[str, TensorSpan], dict[ExpertKey, ExpertLocation]]:
    """Expert tensors (named as the family's conversion mapping names them) apart from the rest, per expert.
    `fmt`: the experts are stored quantized in that format (their integer dtype is expected, int4 packs two
    columns per byte); `moeflow.model.quantized` checks their scales."""
    tensors: dict[str, TensorSpan] = {}
    parts: dict[ExpertKey, list[ExpertPiece]] = {}
    stored = fmt is not None and fmt.kind in STORED_KINDS  # `moeflow quantize` wrote them: [out, in], per expert
    transposed = family.layout.transposed and not stored
    for name, span in shard_tensors.items():
        source = stored_expert_source(family, name) if stored else family.expert_source(name)
        if source is None and fmt is not None and fmt.kind == "mxfp4" and name.endswith(MXFP4_BLOCKS):
            _split_mxfp4_blocks(name, span, family.expert_source(name.removesuffix(MXFP4_BLOCKS)), parts)
            continue
        if source is None:
            tensors[name] = span
            continue
        if fmt is None or span.dtype != fmt.weight_dtype:
            _check_expert_dtype(name, span)
        param = "gate_up" if source.param == "gate_up_proj" else "down"
        if source.expert is None:
            _split_fused(name, span, source, param, transposed, parts)
            continue
        if len(span.shape) != 2:
            raise CheckpointError(f"{name} should be 2-D (one expert's projection), found shape {span.shape}")
        rows = span.shape[1] if transposed else span.shape[0]
        piece = ExpertPiece(span=span, param=param, row=source.part * rows, transposed=transposed)
        parts.setdefault((source.layer, source.expert), []).append(piece)
    packing = 1 if fmt is None else fmt.packing
    experts = {key: _location(key, pieces, packing) for key, pieces in parts.items()}
    return tensors, experts


def _location(key: ExpertKey, pieces: list[ExpertPiece], packing: int = 1) -> ExpertLocation:
    """The expert's pieces must tile its gate_up [2I, D] and down [D, I] exactly (`packing` columns a stored one)."""
    by_param = {p: sorted((x for x in pieces if x.param == p), key=lambda x: x.row) for p in ("gate_up", "down")}
    lacking = [p for p, xs in by_param.items() if not xs]
    if lacking:
        raise CheckpointError(f"expert {key[1]} of layer {key[0]} lacks its {' and '.join(lacking)} projection")
    extent = {}
    for p, xs in by_param.items():
        cols = {x.cols * packing for x in xs}
        covered = 0
        for x in xs:
            if x.row != covered or len(cols) != 1:
                raise CheckpointError(
                    f"expert {key[1]} of layer {key[0]}: the pieces of its {p} projection do not fit together "
                    f"({[x.span.shape for x in xs]}); the checkpoint is incomplete or corrupt"
                )
            covered += x.rows
        extent[p] = (covered, cols.pop())
    (gate_up_rows, hidden), (down_rows, inter) = extent["gate_up"], extent["down"]
    if gate_up_rows != 2 * inter or down_rows != hidden:
        raise CheckpointError(
            f"expert {key[1]} of layer {key[0]} has gate/up {gate_up_rows}x{hidden} and down {down_rows}x{inter}; "
            "expected [2I, D] and [D, I]. The checkpoint is corrupt: convert it again"
        )
    return ExpertLocation(pieces=tuple(by_param["gate_up"] + by_param["down"]), inter=inter, hidden=hidden)


def _check_expert_dtype(name: str, span: TensorSpan) -> None:
    """Expert weights are floating point: an integer tensor would be read as numbers, not weights."""
    if not span.dtype.is_floating_point:
        dtype = next(k for k, v in _DTYPES.items() if v == span.dtype)
        raise CheckpointError(
            f"{span.file}: expert weight {name!r} is stored as {dtype}, not as floating point (F32, F16, BF16); "
            "moeflow would read its integers as weights. The checkpoint is corrupt or quantized in a format "
            "moeflow does not read: download or convert it again in a floating-point dtype"
        )


def _split_mxfp4_blocks(
    name: str, span: TensorSpan, source: ExpertSource | None, parts: dict[ExpertKey, list[ExpertPiece]]
) -> None:
    """gpt-oss's MXFP4 `<experts>.<param>_blocks` [E, rows, cols / 32, 16] (uint8, [out, in] whatever the family's
    memory layout): expert e's packed [rows, cols / 2] is contiguous at offset + e * stride."""
    if source is None or source.expert is not None or len(span.shape) != 4 or span.dtype != torch.uint8:
        raise CheckpointError(f"{name} is not an MXFP4 experts tensor [experts, rows, cols / 32, 16] of uint8 "
                              f"(found {span.dtype} {span.shape}); the checkpoint is corrupt")  # fmt: skip
    n_experts, rows, groups, width = span.shape
    stride = span.nbytes // n_experts
    param = "gate_up" if source.param == "gate_up_proj" else "down"
    for e in range(n_experts):
        piece = TensorSpan(file=span.file, offset=span.offset + e * stride, nbytes=stride, dtype=torch.uint8,
                           shape=(rows, groups * width))  # fmt: skip
        parts.setdefault((source.layer, e), []).append(ExpertPiece(span=piece, param=param, row=0, transposed=False))


def _split_fused(
    name: str,
    span: TensorSpan,
    source: ExpertSource,
    param: str,
    transposed: bool,
    parts: dict[ExpertKey, list[ExpertPiece]],
) -> None:
    """A fused [E, rows, cols] tensor (as the model holds it in memory): expert e's slice is contiguous at
    offset + e * stride."""
    if len(span.shape) != 3:
        raise CheckpointError(f"{name} should be 3-D [experts, rows, cols], found shape {span.shape}")
    n_experts, rows, cols = span.shape
    gate_up_rows = cols if transposed else rows
    if param == "gate_up" and gate_up_rows % 2:
        raise CheckpointError(f"{name} should stack gate and up projections [experts, 2 * rows, cols], found shape "
                              f"{span.shape} with an odd row count; the checkpoint is corrupt: convert it again")
    stride = span.nbytes // n_experts
    for e in range(n_experts):
        piece_span = TensorSpan(
            file=span.file, offset=span.offset + e * stride, nbytes=stride, dtype=span.dtype, shape=(rows, cols)
        )
        parts.setdefault((source.layer, e), []).append(
            ExpertPiece(span=piece_span, param=param, row=0, transposed=transposed)
        )
