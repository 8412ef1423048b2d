"""Read a Hugging Face checkpoint folder without reading its experts.

The safetensors headers are parsed here (8-byte little-endian length, then JSON), so every expert
tensor is located as (file, byte offset, byte length, dtype, shape) and read on demand by a store.
Non-expert tensors are read one by one through `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.errors import CheckpointError
from moeflow.model.families import FUSED_EXPERT_KEY, PER_EXPERT_KEY, Family, family_for, layer_index

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
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024

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
class ExpertLocation:
    """One expert's three projections in transformers' orientation: gate/up [I, D], down [D, I]."""

    gate: TensorSpan
    up: TensorSpan
    down: TensorSpan

    @property
    def spans(self) -> tuple[TensorSpan, TensorSpan, TensorSpan]:
        return (self.gate, self.up, self.down)


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
        """Read one non-expert tensor into host memory (a copy, never an mmap view)."""
        span = self.tensors[name]
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            raw = f.read(span.nbytes)
        if len(raw) != span.nbytes:
            raise CheckpointError(f"{span.file.name} ended while reading {name}; the shard is truncated")
        return torch.frombuffer(bytearray(raw), dtype=span.dtype).reshape(span.shape)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Parse config and every shard header; validate sizes; index the experts. Reads no weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"model folder {str(root)!r} does not exist or is not a folder; pass --model a Hugging Face "
            "folder with config.json and *.safetensors (or omit --model to use the shipped default model)"
        )
    config = _read_config(root)
    family = family_for(config.get("model_type"))
    shard_tensors = {}
    for shard in _shard_files(root):
        shard_tensors.update(_read_header(shard))
    tensors, experts = _split_experts(shard_tensors, family)
    num_experts: dict[int, int] = {}
    for layer, expert in experts:
        num_experts[layer] = max(num_experts.get(layer, 0), expert + 1)
    for layer, n in num_experts.items():
        missing = [e for e in range(n) if (layer, e) not in experts]
        if missing:
            raise CheckpointError(f"layer {layer} lacks experts {missing[:8]}; the checkpoint is incomplete")
    if not experts:
        raise CheckpointError(
            f"no expert tensors found in {root}; expected keys like '...experts.0.{family.gate}.weight'"
        )
    return Checkpoint(
        path=root, config=config, family=family, tensors=tensors, experts=experts, num_experts=num_experts
    )


def _read_config(root: Path) -> dict:
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save or re-download the model") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return config


def _shard_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-save the checkpoint") from e
        shards = sorted({root / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(
                f"shard(s) {', '.join(missing)} listed in {index.name} are missing from {root}; "
                "copy or download them again"
            )
        return shards
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{root} has no *.safetensors files; moeflow reads safetensors checkpoints only")
    return shards


def _read_header(shard: Path) -> dict[str, TensorSpan]:
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shard} is truncated ({size} bytes); copy or download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{shard} has a corrupt safetensors header; copy or download it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{shard} has a corrupt safetensors header ({e})") from e
    base = 8 + header_len
    out: dict[str, TensorSpan] = {}
    end_max = base
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{shard}: tensor {name!r} has a malformed header entry") from e
        out[name] = TensorSpan(file=shard, offset=base + start, nbytes=end - start, dtype=dtype, shape=shape)
        end_max = max(end_max, base + end)
    if end_max > size:
        raise CheckpointError(
            f"{shard} is truncated: its header needs {end_max} bytes but the file has {size}; "
            "copy or download it again"
        )
    return out


def _split_experts(
    shard_tensors: dict[str, TensorSpan], family: Family
) -> tuple[dict[str, TensorSpan], dict[ExpertKey, ExpertLocation]]:
    tensors: dict[str, TensorSpan] = {}
    parts: dict[ExpertKey, dict[str, TensorSpan]] = {}
    role_of = {family.gate: "gate", family.up: "up", family.down: "down"}
    for name, span in shard_tensors.items():
        m = PER_EXPERT_KEY.match(name)
        if m and m.group("proj") in role_of:
            key = (layer_index(name), int(m.group("expert")))
            parts.setdefault(key, {})[role_of[m.group("proj")]] = span
            continue
        m = FUSED_EXPERT_KEY.match(name)
        if m:
            _split_fused(name, span, m.group("proj"), parts)
            continue
        tensors[name] = span
    experts = {}
    for key, roles in parts.items():
        if set(roles) != {"gate", "up", "down"}:
            missing = sorted({"gate", "up", "down"} - set(roles))
            raise CheckpointError(f"expert {key[1]} of layer {key[0]} lacks its {', '.join(missing)} projection")
        experts[key] = ExpertLocation(gate=roles["gate"], up=roles["up"], down=roles["down"])
    return tensors, experts


def _split_fused(name: str, span: TensorSpan, proj: str, parts: dict[ExpertKey, dict[str, TensorSpan]]) -> None:
    """A fused [E, 2I, H] or [E, H, I] tensor: expert e's slice is contiguous at offset + e * stride."""
    if len(span.shape) != 3:
        raise CheckpointError(f"{name} should be 3-D [experts, rows, cols], found shape {span.shape}")
    n_experts, rows, cols = span.shape
    stride = span.nbytes // n_experts
    layer = layer_index(name)
    for e in range(n_experts):
        off = span.offset + e * stride
        slot = parts.setdefault((layer, e), {})
        if proj == "down_proj":
            slot["down"] = TensorSpan(file=span.file, offset=off, nbytes=stride, dtype=span.dtype, shape=(rows, cols))
        else:
            half = stride // 2
            shape = (rows // 2, cols)
            slot["gate"] = TensorSpan(file=span.file, offset=off, nbytes=half, dtype=span.dtype, shape=shape)
            slot["up"] = TensorSpan(file=span.file, offset=off + half, nbytes=half, dtype=span.dtype, shape=shape)
