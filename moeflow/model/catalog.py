"""Every MoE model type of the installed transformers, and whether moeflow serves it (and why not).

A model type counts as MoE when its modeling file defines an experts class (`class ...Experts(`) or uses
`@use_experts_implementation`. Each one is described the way the engine describes a checkpoint
(`families.describe`), on a tiny config of its own class built on the meta device, so the status is
computed, not kept by hand: "tested" (the engine-exactness suite runs it, `moeflow.testing.TESTED_FAMILIES`,
with the transformers version in `TESTED_WITH`), "derived" (described without a refusal, not in the suite),
"refused" with the reason the description found, or "uninspected" when no small config of it could be built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

from moeflow.errors import UnsupportedArchitectureError
from moeflow.model.families import Refused, causal_lm_class_name, describe_model, experts_modules, meta_model
from moeflow.testing import TESTED_FAMILIES, TESTED_WITH, family_config

_EXPERTS = re.compile(r"^class \w*Experts?\w*\(|@use_experts_implementation", re.MULTILINE)


@dataclass(frozen=True, kw_only=True)
class FamilyStatus:
    model_type: str
    status: str  # "tested" | "derived" | "refused" | "uninspected"
    detail: str  # the experts class and its layout, or the reason for a refusal


def moe_model_types() -> list[str]:
    """The model types whose transformers modeling code defines routed experts, causal LMs first per folder."""
    models = Path(transformers.__file__).parent / "models"
    folders: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        folders.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    out = []
    for folder, types in sorted(folders.items()):
        texts = [p.read_text(errors="ignore") for p in (models / folder).glob("modeling_*.py")]
        if not any(_EXPERTS.search(t) for t in texts):
            continue
        lms = [t for t in types if causal_lm_class_name(t) is not None]
        out += lms or [folder if folder in types else types[0]]
    return out


def family_status(model_type: str) -> FamilyStatus:
    try:
        config = family_config(model_type)
    except Exception as e:  # noqa: BLE001 - any config class that cannot be shrunk: say so, keep listing
        detail = f"no small config of it could be built to inspect it ({e})"[:200]
        return FamilyStatus(model_type=model_type, status="uninspected", detail=detail)
    try:
        model = meta_model(config)
        if not experts_modules(model):  # the tiny config may have left only dense layers: the real shape decides
            model = meta_model(type(config)())
        family = describe_model(model)
    except UnsupportedArchitectureError as e:
        reason = str(e).split("moeflow: ", 1)[-1].split(". `moeflow families`")[0]
        return FamilyStatus(model_type=model_type, status="refused", detail=reason)
    except Refused as e:
        return FamilyStatus(model_type=model_type, status="refused", detail=str(e))
    except Exception as e:  # noqa: BLE001 - transformers' own code failed to build it: the reason, as it says it
        detail = f"transformers could not build it from a small config ({e})"[:200]
        return FamilyStatus(model_type=model_type, status="uninspected", detail=detail)
    layout = family.layout
    named = (("transposed", layout.transposed), ("interleaved gate/up", layout.interleaved),
             ("expert biases", layout.has_bias), ("one sequence at a time", family.one_sequence_cache))  # fmt: skip
    flags = [f for f, on in named if on]
    detail = f"{layout.experts_class}: {layout.activation}" + (f"; {', '.join(flags)}" if flags else "")
    status = "tested" if model_type in TESTED_FAMILIES else "derived"
    return FamilyStatus(model_type=model_type, status=status, detail=detail)


def catalog() -> list[FamilyStatus]:
    return [family_status(t) for t in moe_model_types()]


def render_markdown(rows: list[FamilyStatus]) -> str:
    """The table docs/families.md holds (`python scripts/families_doc.py` writes it)."""
    counts = {s: sum(r.status == s for r in rows) for s in ("tested", "derived", "refused", "uninspected")}
    lines = [
        "# Model families",
        "",
        f"Every MoE model type of transformers {transformers.__version__}, as `moeflow families` lists it. "
        f"**tested**: the engine-exactness suite (tests/engine/test_engine_families.py) runs it with transformers "
        f"{TESTED_WITH} and greedy tokens equal plain transformers'; **derived**: described from transformers "
        "without a refusal, not in the suite; **refused**: the reason the description found; **uninspected**: "
        "no small config of it could be built here, so it was not described. \"one sequence at a "
        "time\": the model's cache holds linear-attention or SSM state, sliding windows or is its own class, "
        "which cannot be padded into a batch, so its sequences decode one after another.",
        "",
        f"{counts['tested']} tested, {counts['derived']} derived, {counts['refused']} refused, "
        f"{counts['uninspected']} uninspected. Generated by "
        "`python scripts/families_doc.py`; do not edit by hand.",
        "",
        "| model_type | status | experts / reason |",
        "|---|---|---|",
    ]
    lines += [f"| {r.model_type} | {r.status} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"
