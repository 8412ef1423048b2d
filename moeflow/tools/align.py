"""`moeflow align`: a copy of a checkpoint laid out so that expert reads land straight in their slots.

safetensors' own writer puts a shard's data right after its header, which rarely ends on a whole page, and
orders the tensors by dtype and name: almost no expert lies on whole pages of its file, so every miss from disk
goes through a bounce buffer and a copy, and an expert's gate and up matrices (w1 and w3 of a Mixtral, with w2
between them) come in separate reads. The copy holds the same tensors under the same names in shards of the same
names (transformers loads it as it loads the original); each shard is rewritten with every expert's tensors first,
expert by expert in the slot's order (gate, up, then down), each on whole pages of the file (`page_first`,
`save_ordered`), then the other tensors. The store then reads an expert's gate and up in one O_DIRECT request
straight into the slot and its down matrix in another (`moeflow.offload.store`). One shard at a time is held in
memory; a quantized folder (`moeflow quantize`) is already laid out this way.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.model.quantized import declared_format
from moeflow.tools.quantize import copy_rest, page_first, refuse_taken, save_ordered, slot_order, written_whole


def align_checkpoint(src: str | Path, out: str | Path, *, progress: bool = True) -> Path:
    """Write `src` to the new folder `out` with every expert on whole pages of its shard, in the slot's order."""
    src, out = Path(src), Path(out)
    refuse_taken(out, "moeflow align")
    ckpt = open_checkpoint(src)
    if declared_format(ckpt.config) is not None:
        raise MoeflowError(f"{src} was written by moeflow quantize, which already lays experts out on whole pages")
    family = ckpt.family
    files = {s.file for s in ckpt.tensors.values()} | {s.file for loc in ckpt.experts.values() for s in loc.spans}
    with written_whole(out):
        for shard in tqdm(sorted(files), desc="aligning", unit="shard", disable=not progress):
            with safe_open(shard, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            ordered = dict(sorted(tensors.items(), key=lambda item: slot_order(family, item[0])))
            save_ordered(page_first(ordered), out / shard.name)
            del tensors, ordered
        copy_rest(src, out)  # config, index (the same shard names), tokenizer, predictors, ...
    return out
