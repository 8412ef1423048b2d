"""The MoE architectures moeflow offloads, and how each names its experts on disk.

transformers 5 keeps each family's experts as fused 3-D parameters in memory
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) behind `@use_experts_implementation`,
but checkpoints store them per expert. A family entry says how to find them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeflow.errors import UnsupportedArchitectureError


@dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str
    display_name: str
    gate: str  # per-expert projection names on disk: gate (SiLU side), up, down
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()  # on-disk substring -> in-memory substring (non-expert keys)

    def memory_name(self, disk_name: str) -> str:
        for old, new in self.renames:
            disk_name = disk_name.replace(old, new)
        return disk_name


_QWEN_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            model_type="mixtral",
            display_name="Mixtral",
            gate="w1",
            up="w3",
            down="w2",
            renames=((".block_sparse_moe.", ".mlp."),),
        ),
        Family(model_type="qwen2_moe", display_name="Qwen2-MoE", **_QWEN_NAMES),
        Family(model_type="qwen3_moe", display_name="Qwen3-MoE", **_QWEN_NAMES),
        Family(model_type="olmoe", display_name="OLMoE", **_QWEN_NAMES),
        Family(model_type="deepseek_v3", display_name="DeepSeek-V3", **_QWEN_NAMES),
    )
}

# `<prefix>.experts.<e>.<proj>.weight` (per expert) or `<prefix>.experts.<gate_up_proj|down_proj>` (fused).
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def family_for(model_type: str | None) -> Family:
    try:
        return FAMILIES[model_type or ""]
    except KeyError:
        supported = ", ".join(f"{f.display_name} ({f.model_type})" for f in FAMILIES.values())
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by moeflow. Supported architectures: {supported}. "
            "Convert the checkpoint to one of these, or open an issue naming the architecture."
        ) from None


def layer_index(name: str) -> int:
    m = LAYER_INDEX.search("." + name)
    if m is None:
        raise ValueError(f"cannot find a decoder layer index in {name!r}")
    return int(m.group(1))
