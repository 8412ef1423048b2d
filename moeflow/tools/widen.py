"""An I/O-bound copy of a model with the same outputs: every expert widened with zeros.

Each expert's intermediate size grows from I to `intermediate_size` by appending zero rows to its
gate and up projections and zero columns to its down projection. The new units compute
SiLU(0) * 0 = 0 and contribute 0 through their zero down columns, so the model's routing and its
greedy tokens are those of the original (tests/tools/test_widen.py checks it token for token), the
trained routing predictors still apply, and every expert miss moves many more bytes. This is the
regime of a Mixtral on a small GPU: reading an expert costs far more than computing it, and the
routing is learned, hence predictable. `bench/expertflow.py` builds one on demand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.tools.quantize import save_ordered, slot_order

_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
           "heldout_files.txt", "train_files.txt")  # fmt: skip


def widen_experts(src: str | Path, out: str | Path, intermediate_size: int, *, progress: bool = True) -> Path:
    """Write `src` with every expert widened to `intermediate_size` (one shard per MoE layer) to `out`."""
    src, out = Path(src), Path(out)
    ckpt = open_checkpoint(src)
    family = ckpt.family
    if family.layout.transposed:
        raise MoeflowError(f"{family.model_type} stores its experts transposed; only [rows, D] experts can be widened")
    key = "moe_intermediate_size" if "moe_intermediate_size" in ckpt.config else "intermediate_size"
    inter = int(ckpt.config[key])
    if intermediate_size < inter:
        raise MoeflowError(f"intermediate_size {intermediate_size} is below the model's {inter}; widen, not narrow")
    out.mkdir(parents=True, exist_ok=True)
    names_by_file: dict[Path, list[str]] = {}
    for name, span in ckpt.tensors.items():
        names_by_file.setdefault(span.file, []).append(name)
    for loc in ckpt.experts.values():
        for span in loc.spans:
            names_by_file.setdefault(span.file, [])
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for file in tqdm(sorted(names_by_file), desc="widening", unit="shard", disable=not progress):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(name)
                source = family.expert_source(name)
                if source is not None and source.expert is None:
                    raise MoeflowError(f"{name}: only per-expert checkpoints can be widened")
                if source is not None and source.param == "gate_up_proj":  # a gate or up piece [I, D]
                    t = torch.cat([t, t.new_zeros(intermediate_size - t.shape[0], t.shape[1])])
                elif source is not None:  # down [D, I]
                    t = torch.cat([t, t.new_zeros(t.shape[0], intermediate_size - t.shape[1])], dim=1)
                shard = f"layer-{source.layer}" if source is not None else "dense"
                shards.setdefault(shard, {})[name] = t.contiguous()
    weight_map = {}
    for shard, tensors in shards.items():
        fname = f"model-{shard}.safetensors"
        save_ordered(dict(sorted(tensors.items(), key=lambda item: slot_order(family, item[0]))), out / fname)
        weight_map.update(dict.fromkeys(tensors, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = dict(ckpt.config, **{key: intermediate_size})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (src / "predictors").is_dir():
        shutil.copytree(src / "predictors", out / "predictors", dirs_exist_ok=True)
    return out
