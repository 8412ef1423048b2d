"""Building a transformers MoE model from a checkpoint without reading its experts.

The model is built with every parameter on the meta device (no weight memory), its experts
modules are found (`experts_modules`) for the offload pass, and then only the non-expert tensors
are read into it, one at a time. Tokenizer and end-of-sequence ids come from the same files
transformers' own `generate` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from moeflow.errors import CheckpointError
from moeflow.model.checkpoint import Checkpoint
from moeflow.model.families import experts_modules  # noqa: F401 - the engine finds the experts here too
from moeflow.model.quantized import FP8_SCALE_SUFFIX, dequantize_fp8

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device, ckpt: Checkpoint) -> torch.dtype:
    """The compute dtype: `name`, or for "auto" the checkpoint's experts' dtype on every device, as transformers
    loads it (a bf16/fp16 checkpoint stays 16-bit on the CPU: upcasting would double every expert's bytes)."""
    if name != "auto":
        return DTYPES[name]
    return next(iter(ckpt.experts.values())).dtype


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device; buffers (rotary tables) stay real."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(hf_config: object, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device; no weight memory is allocated yet."""
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def expert_geometry(ckpt: Checkpoint, modules: dict[int, nn.Module]) -> tuple[int, int]:
    """(I, D) of every expert; the experts modules' own parameter shapes must agree with the checkpoint's."""
    if sorted(modules) != ckpt.moe_layers:
        raise CheckpointError(
            f"the config defines MoE layers {sorted(modules)} but the checkpoint has experts for layers "
            f"{ckpt.moe_layers}; config.json and the weights do not belong together"
        )
    shapes = set()
    for layer, module in modules.items():
        n_experts, *gate_up = module.gate_up_proj.shape
        if module.is_transposed:
            gate_up.reverse()
        inter, hidden = gate_up[0] // 2, gate_up[1]
        if ckpt.num_experts[layer] != n_experts:
            raise CheckpointError(
                f"layer {layer}: config says {n_experts} experts, checkpoint has {ckpt.num_experts[layer]}"
            )
        for e in range(n_experts):
            loc = ckpt.experts[(layer, e)]
            if (loc.inter, loc.hidden) != (inter, hidden):
                raise CheckpointError(
                    f"expert {e} of layer {layer} has intermediate size {loc.inter} and hidden size {loc.hidden}; "
                    f"the config expects {inter} and {hidden}"
                )
        shapes.add((inter, hidden))
    if len(shapes) != 1:
        raise CheckpointError(f"experts of different sizes across layers ({sorted(shapes)}) are not supported")
    return shapes.pop()


def load_dense_weights(model: nn.Module, ckpt: Checkpoint, hf_config: object) -> None:
    """Read every non-expert tensor from the checkpoint into the skeleton, one tensor at a time."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded = set()
    converted: dict[str, list[str]] = {}  # a converted tensor's model name -> the checkpoint tensors it is made of
    for disk_name in ckpt.tensors:
        name, pattern = ckpt.family.memory_key(disk_name)
        if pattern is not None:  # transformers converts it while loading (concatenated, split, ...): below
            converted.setdefault(name, []).append(disk_name)
            continue
        current = targets.get(name, buffers.get(name))
        if current is None:
            log.debug("ignoring checkpoint tensor %s (not used by the model)", disk_name)
            continue
        tensor = ckpt.read_tensor(disk_name)
        if disk_name + FP8_SCALE_SUFFIX in ckpt.tensors:  # DeepSeek-V3's block FP8: dequantized as transformers does
            tensor = dequantize_fp8(tensor, ckpt.read_tensor(disk_name + FP8_SCALE_SUFFIX), name=disk_name)
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"checkpoint tensor {disk_name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current.shape)}; config.json and the weights do not belong together"
            )
        if current.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"checkpoint tensor {disk_name} in {ckpt.tensors[disk_name].file.name} is stored as {tensor.dtype}, "
                f"but the model's {name} holds floating-point weights; its integers would be read as weights. The "
                "checkpoint is corrupt: download or convert it again"
            )
        _set_tensor(model, name, tensor.to(current.dtype), is_param=name in targets)
        loaded.add(name)
    for name, disk_names in converted.items():
        sources = {d: ckpt.read_tensor(d) for d in disk_names}
        for target, tensor in ckpt.family.convert_dense(name, sources, model, hf_config).items():
            current = targets.get(target, buffers.get(target))
            if current is None:
                continue
            if tuple(tensor.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"checkpoint tensors {disk_names} convert to {target} of shape {tuple(tensor.shape)}, the model "
                    f"expects {tuple(current.shape)}; config.json and the weights do not belong together"
                )
            _set_tensor(model, target, tensor.to(current.dtype), is_param=target in targets)
            loaded.add(target)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    missing = sorted(n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta")
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}; "
            "it is incomplete or belongs to another config"
        )


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, *, is_param: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_param:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_tokenizer(path: Path) -> object | None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(path: Path, hf_config: object, tokenizer: object | None) -> set[int]:
    """The tokens that end generation, from the same place transformers' `generate` reads them."""
    try:
        gen_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        gen_config = GenerationConfig.from_model_config(hf_config)
    eos = gen_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def generation_defaults(path: Path) -> dict[str, float]:
    """The sampling defaults of the model's generation_config.json, as transformers' `generate` applies them.

    `repetition_penalty` always; temperature, top_k, top_p and min_p only when the file says `do_sample`
    (otherwise transformers decodes greedily and ignores them). Keys the model leaves unset are absent, so
    the request's own values or the neutral ones apply (`moeflow.config.SamplingParams.resolve`).
    """
    try:
        gen_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: nothing to default to
        return {}
    defaults: dict[str, float] = {}
    if gen_config.repetition_penalty is not None and gen_config.repetition_penalty != 1.0:
        defaults["repetition_penalty"] = float(gen_config.repetition_penalty)
    if gen_config.do_sample:
        defaults["temperature"] = float(gen_config.temperature if gen_config.temperature is not None else 1.0)
        for name in ("top_k", "top_p", "min_p"):
            value = getattr(gen_config, name)
            if value is not None:
                defaults[name] = int(value) if name == "top_k" else float(value)
    return defaults
