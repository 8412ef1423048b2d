"""`moeflow quantize`: write a copy of a model whose experts are stored quantized, so each miss reads few bytes.

Every routed expert's gate, up and down weight is quantized (`moeflow.kernels.quant`, layout in
docs/quantization.md) and stored per expert, [out, in], under its own name (a family whose checkpoints fuse a
layer's experts into one tensor: under that tensor's name and the expert's index, `<name>.<e>`), its scale
beside it as `<name>_scale`;
every other tensor (attention, norms, embeddings, routers, shared experts) is copied unchanged.
config.json gains `moeflow_quantization`, which is how the engine knows to read the experts quantized.
One output shard per input shard; tokenizer, generation config, corpus lists and predictors are copied.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moeflow.errors import MoeflowError
from moeflow.kernels.quant import GATE_UP_PIECES, ExpertFormat, quantize
from moeflow.model.checkpoint import Checkpoint, open_checkpoint
from moeflow.model.families import Family
from moeflow.model.quantized import (
    CONFIG_KEY,
    FORMAT_VERSION,
    SCALE_SUFFIX,
    STORED_KINDS,
    declared_format,
    fused_slice_name,
)


def quantize_checkpoint(
    src: str | Path, out: str | Path, expert_dtype: str, *, group_size: int = 128, progress: bool = True
) -> Path:
    """Write `src` with its experts stored as `expert_dtype` (int8, or int4 with `group_size`) to `out`."""
    src, out = Path(src), Path(out)
    if expert_dtype not in STORED_KINDS:
        raise MoeflowError(f"moeflow quantize writes {' or '.join(STORED_KINDS)} experts, not {expert_dtype!r}")
    try:
        fmt = ExpertFormat(kind=expert_dtype, group_size=group_size if expert_dtype == "int4" else 0)
    except ValueError as e:
        raise MoeflowError(str(e)) from None
    refuse_taken(out, "moeflow quantize")
    ckpt = open_checkpoint(src)
    stored = declared_format(ckpt.config)
    if stored is not None:
        raise MoeflowError(
            f"{src} is already quantized ({stored.name} experts); moeflow quantize starts from a full-precision model. "
            f"Load this folder as it is (moeflow reads {stored.name} experts), or quantize the full-precision model"
        )
    dtypes = {loc.dtype for loc in ckpt.experts.values()}
    source_dtype = str(dtypes.pop()).removeprefix("torch.")
    if dtypes:
        raise MoeflowError(f"{src} stores its experts in several dtypes; moeflow quantize needs one")
    with written_whole(out):
        _write_folder(ckpt, src, out, fmt, source_dtype, progress)
    return out


def refuse_taken(out: Path, command: str) -> None:
    """A clear error where `out` exists and is not an empty folder: `command` writes new folders only."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeflowError(f"{out} already exists and is not an empty folder; {command} never overwrites: "
                           "choose a new --out or remove it first")  # fmt: skip


@contextmanager
def written_whole(out: Path) -> Iterator[None]:
    """Create the folder `out` (absent or empty) for the block to write; where the block fails, nothing half-written
    stays behind: the folder is left as it was (absent, or empty)."""
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir(parents=True, exist_ok=True)
        raise


def _write_folder(ckpt: Checkpoint, src: Path, out: Path, fmt: ExpertFormat, source_dtype: str, progress: bool) -> None:
    """The quantized copy of `src` into the empty folder `out`: shards, index, config.json, the other files."""
    transposed = ckpt.family.layout.transposed
    files = {s.file for s in ckpt.tensors.values()} | {s.file for loc in ckpt.experts.values() for s in loc.spans}
    weight_map: dict[str, str] = {}
    pieces = sum(len(loc.pieces) for loc in ckpt.experts.values())
    bar = tqdm(total=pieces, desc=f"quantizing experts to {fmt.name}", unit="tensor", disable=not progress)
    for shard in sorted(files):
        tensors: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # each expert's tensors, written together
        ranks: dict[str, tuple[bool, int, int]] = {}  # where each of them goes in its expert (`_page_order`)
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                source = ckpt.family.expert_source(name)
                if source is None:
                    tensors[name] = f.get_tensor(name).contiguous()
                    continue
                # Per expert, [out, in] as the slot holds it: a fused [E, ...] tensor is sliced (each slice stored
                # under `fused_slice_name`), a transposed family's weight turned back (granitemoe, gpt-oss, ...).
                whole = f.get_tensor(name)
                slices = [(name, source.expert, whole)] if source.expert is not None else [
                    (fused_slice_name(name, e), e, whole[e]) for e in range(whole.shape[0])]  # fmt: skip
                # int4 packs a slot's gate_up as its two halves: a tensor holding both (one part) packs them apart
                halves = GATE_UP_PIECES // source.parts if source.param == "gate_up_proj" else 1
                if fmt.kind == "int4" and halves * source.parts not in (1, GATE_UP_PIECES):
                    raise MoeflowError(f"{name} is one of {source.parts} gate/up pieces; int4 packs gate and up apart")
                for stored_name, expert, weight in slices:
                    w = weight.t() if transposed else weight
                    try:
                        q, scale = quantize(w.contiguous(), fmt, pieces=max(halves, 1))
                    except ValueError as e:
                        raise MoeflowError(f"{stored_name}: {e}. Quantize this model to int8 (any size)") from None
                    mine = experts.setdefault((source.layer, expert), {})
                    mine[stored_name], mine[stored_name + SCALE_SUFFIX] = q, scale
                    down = source.param != "gate_up_proj"  # the slot's order: gate, up, then down; weights, scales
                    ranks[stored_name] = (down, 0, source.part)
                    ranks[stored_name + SCALE_SUFFIX] = (down, 1, source.part)
                    bar.update(1)
        ordered = _page_order({key: dict(sorted(mine.items(), key=lambda item: ranks[item[0]]))
                               for key, mine in experts.items()}, tensors)  # fmt: skip
        save_ordered(ordered, out / shard.name)
        weight_map.update(dict.fromkeys(ordered, shard.name))
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    spec = {"expert_dtype": fmt.kind, "group_size": fmt.group_size, "source_dtype": source_dtype,
            "version": FORMAT_VERSION}  # fmt: skip
    (out / "config.json").write_text(json.dumps({**ckpt.config, CONFIG_KEY: spec}, indent=1))
    copy_rest(src, out, skip=("config.json", "model.safetensors.index.json"))


def copy_rest(src: Path, out: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Everything in `src` but its shards and the names in `skip` (tokenizer, generation config, corpus lists,
    predictors, ...) copied into `out`; `out` itself left out where it lies inside `src`."""
    for entry in src.iterdir():
        if entry.name in skip or entry.suffix == ".safetensors" or entry.resolve() == out.resolve():
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name)
        else:
            shutil.copy2(entry, out / entry.name)


def _page_order(
    experts: dict[tuple[int, int], dict[str, torch.Tensor]], others: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A shard's tensors in the order `save_ordered` writes them (`page_first`): expert by expert, each expert's in
    its order (`experts`' own: gate and up weights, their scales, the down projection's), then the other tensors.
    Gate and up weights come in one O_DIRECT request straight into the slot, their scales in another
    (`moeflow.offload.store`); the experts' smaller tensors (a down projection's int8 scales: one float a row) go
    after all of them, read through a buffer."""
    return page_first({name: t for key in sorted(experts) for name, t in experts[key].items()} | others)


def page_first(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with those of whole pages first, each group in its given order: written by `save_ordered`, each of
    the first lies on whole pages of the file, where an O_DIRECT read can put it straight into a slot."""
    paged = {name: t for name, t in tensors.items() if t.nbytes % _PAGE == 0}
    return paged | {name: t for name, t in tensors.items() if name not in paged}


def slot_order(family: Family, name: str) -> tuple:
    """Where tensor `name` goes in a shard laid out for the slots: every expert's tensors first, layer by layer and
    expert by expert (a layer's fused tensor first), each in its slot's order (gate, up, then down), the others
    after them."""
    source = family.expert_source(name)
    if source is None:
        return (1, 0, 0, False, 0, name)
    expert = -1 if source.expert is None else source.expert
    return (0, source.layer, expert, source.param != "gate_up_proj", source.part, name)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


_PAGE = 4096


def save_ordered(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the tensors' data in the dict's order (safetensors' own writer groups them by
    dtype, which would put an expert's scales megabytes away from its int8 weights; `_page_order` chooses the
    order here). The data starts
    on a whole page (the header padded with spaces, as the format allows), so a tensor whose offset is a
    multiple of 4096 bytes lies on whole pages of the file: an O_DIRECT read can put it straight into a slot
    (`moeflow.offload.store`)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _PAGE)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
