"""Tile configurations for the fused MoE kernels, stored as data keyed by device and shape.

``configs/fused_moe_<device>.json`` (device: the GPU's name with spaces as underscores, or
``interpreter``) maps a shape key ``E=..,D=..,I=..,K=..,dtype=..`` (or ``default,dtype=..``, or
``default``) to ``{T: tile}``; the first key present in that order is used, and in it the tile with
the largest T not above the call's T. A device without a file uses ``fused_moe_default.json``, whose
fp32 entry halves block_k: fp32 operands are twice as wide, and the bf16 tiles would need more shared
memory than an sm_86 GPU has (``python -m moeflow.kernels.aot`` checks every stored tile against it).
``python -m moeflow.kernels.tune`` writes these files on a GPU; it refuses to run under the interpreter, where
autotuning does not work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from moeflow.kernels.backend import device_key

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True, kw_only=True)
class TileConfig:
    """One launch configuration, shared by the forward and backward grouped GEMMs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: tiles must be powers of two >= 16 (tl.dot's minimum)")

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_key(num_slots: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype) -> str:
    return f"E={num_slots},D={hidden},I={inter},K={top_k},dtype={_dtype_name(dtype)}"


def default_key(dtype: torch.dtype) -> str:
    """The untuned entry for one dtype, used before the dtype-agnostic ``default``."""
    return f"default,dtype={_dtype_name(dtype)}"


@cache
def _load(device: str) -> dict[str, dict[int, TileConfig]]:
    path = CONFIG_DIR / f"fused_moe_{device}.json"
    if not path.exists():
        path = CONFIG_DIR / "fused_moe_default.json"
    raw = json.loads(path.read_text())["configs"]
    return {key: {int(t): TileConfig(**cfg) for t, cfg in by_t.items()} for key, by_t in raw.items()}


def get_config(
    num_tokens: int, num_slots: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype, device: torch.device
) -> TileConfig:
    """The stored tile for this call: exact shape entry if tuned, else the device's default entry."""
    table = _load(device_key(device))
    by_t = (
        table.get(shape_key(num_slots, hidden, inter, top_k, dtype))
        or table.get(default_key(dtype))
        or table["default"]
    )
    fitting = [t for t in by_t if t <= num_tokens]
    return by_t[max(fitting) if fitting else min(by_t)]
