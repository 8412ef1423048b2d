"""How a transformers MoE family keeps its experts, derived from transformers itself.

transformers 5 keeps each family's routed experts as fused 3-D parameters behind
`@use_experts_implementation` (`gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`, optional
`gate_up_proj_bias [E, 2I]` / `down_proj_bias [E, D]`; `is_transposed` families hold `[E, D, 2I]` and
`[E, I, D]`, `is_concatenated=False` ones interleave gate and up rows). Checkpoints store them as the
family's conversion mapping says (`transformers.conversion_mapping`): per expert (`experts.<e>.w1`,
`experts.<e>.gate_proj`, ...) merged by `MergeModulelist` + `Concatenate`, or already fused under a
name a `WeightRenaming` gives (granitemoe's `input_linear`), or as in memory (gpt-oss).

`describe(hf_config)` builds the model on the meta device, asks its experts modules for the decorator's
flags and transformers for its weight transforms, and returns a `Family` that maps every checkpoint key
to the model's name for it (`memory_key`) and says which expert parameter a key feeds. A family that
cannot be served raises `UnsupportedArchitectureError` naming the reason it found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)
from transformers.integrations.moe import _default_apply_gate
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moeflow.errors import UnsupportedArchitectureError

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# `<prefix>.experts.<e>.<proj>.weight`: the per-expert key shape every family's converters merge from.
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
# The routed-expert parameters moeflow keeps in the slot pool. Expert biases (`gate_up_proj_bias [E, 2I]`,
# `down_proj_bias [E, D]`) stay resident with the router: E x (2I + D) values a layer, the router's order of
# size (E x D), not the experts' (E x 3ID).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def layer_index(name: str) -> int:
    m = LAYER_INDEX.search("." + name)
    if m is None:
        raise ValueError(f"cannot find a decoder layer index in {name!r}")
    return int(m.group(1))


@dataclass(frozen=True, kw_only=True)
class ExpertsLayout:
    """The flags `@use_experts_implementation` gave the family's experts class, and its gate."""

    experts_class: str
    transposed: bool  # in memory gate_up [E, D, 2I], down [E, I, D]
    interleaved: bool  # gate/up rows alternate (gpt-oss) instead of gate rows then up rows
    has_bias: bool
    activation: str  # what `_apply_gate` computes, for people


@dataclass(frozen=True, kw_only=True)
class ExpertSource:
    """What one checkpoint key holds of a layer's expert parameter `param` (a name in EXPERT_PARAMS).

    Per expert (`expert` set): the disk tensor is the expert's `part`-th of `parts` equal pieces along the
    parameter's concatenation axis. Fused (`expert` None): the disk tensor is the whole [E, ...] parameter.
    """

    layer: int
    param: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


@dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str
    layout: ExpertsLayout
    top_k: int  # experts per token (`routed_top_k`)
    # The model's cache is more than full-attention keys and values (linear-attention or SSM state, sliding
    # windows, a cache class of its own): it cannot be left-padded into a batch, one sequence decodes at a time.
    one_sequence_cache: bool
    _renamings: list = field(repr=False, compare=False)
    _converters: list = field(repr=False, compare=False)
    _prefix: str = field(repr=False, compare=False)
    _names: frozenset = field(repr=False, compare=False)  # every parameter and buffer name of the model
    _expert_params: dict = field(repr=False, compare=False)  # memory name -> (layer, param)

    def memory_key(self, disk_key: str) -> tuple[str, str | None]:
        """The model's name for checkpoint key `disk_key`, and the converter pattern it matched (None: renamed)."""
        names = _NameSet(self._names)
        memory, pattern = rename_source_key(disk_key, self._renamings, self._converters, self._prefix, names)
        if memory not in self._names and disk_key in self._names:
            memory, pattern = rename_source_key(disk_key, [], [], self._prefix, names)
        return memory, pattern

    def expert_source(self, disk_key: str) -> ExpertSource | None:
        """What `disk_key` holds of an expert parameter, or None for a non-expert tensor."""
        memory, pattern = self.memory_key(disk_key)
        target = self._expert_params.get(memory)
        if target is None:
            return None
        layer, param = target
        if pattern is None:
            return ExpertSource(layer=layer, param=param)
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        regex = pattern.replace("*.", r"(\d+)\.")  # transformers reads a source pattern as a regex, `*` an index
        m = re.search(regex, disk_key)
        assert m is not None, (disk_key, pattern)
        sources = converter.source_patterns
        return ExpertSource(
            layer=layer, param=param, expert=int(m.group(1)), part=sources.index(pattern), parts=len(sources)
        )


    def convert_dense(
        self, name: str, tensors: dict[str, torch.Tensor], model: nn.Module, config: PreTrainedConfig
    ) -> dict[str, torch.Tensor]:
        """What transformers' converter makes of the checkpoint tensors `tensors` (disk name -> tensor), which all
        feed the model's `name` (their `memory_key`): its operations in order (concatenate, split, permute...),
        then the results named as the model names them."""
        by_pattern: dict[str, list[torch.Tensor]] = {}
        converter = None
        for disk_key, tensor in tensors.items():
            _, pattern = self.memory_key(disk_key)
            converter = next(c for c in self._converters if pattern in c.source_patterns)
            by_pattern.setdefault(pattern, []).append(tensor)
        assert converter is not None
        out: dict = by_pattern
        for op in converter.operations:
            out = op.convert(
                out,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=name,
                model=model,
                config=config,
            )
        key = next(k for k in out if k in name)  # the target `name` was rendered from; the others share its place
        prefix, _, suffix = name.partition(key)
        return {prefix + k + suffix: v for k, v in out.items()}


class _NameSet(dict):
    """A read-only name -> True view of the model's names: what `rename_source_key` asks of a meta state dict."""

    def __init__(self, names: frozenset) -> None:
        super().__init__()
        self._names = names

    def get(self, key: str, default: object = None) -> object:
        return True if key in self._names else default

    def __contains__(self, key: object) -> bool:
        return key in self._names


def causal_lm_class_name(model_type: str) -> str | None:
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def meta_model(hf_config: PreTrainedConfig) -> nn.Module:
    """The family's causal LM with every tensor on the meta device (no memory), for inspection."""
    if causal_lm_class_name(hf_config.model_type) is None:
        raise _refusal(hf_config.model_type, "transformers has no causal-LM class for it (AutoModelForCausalLM)")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The routed-experts modules behind `use_experts_implementation`, by decoder layer index."""
    return {
        layer_index(name): module
        for name, module in model.named_modules()
        if name.endswith(".experts") and hasattr(module, "has_gate") and hasattr(module, "_apply_gate")
    }


# What transformers' configs call the experts a token is routed to; Gemma 4 names it top_k_experts.
_TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_k", "moe_topk", "num_experts_per_token")


def routed_top_k(hf_config: PreTrainedConfig) -> int:
    """Experts per token, from the language model's config (a vision-language config keeps it in its text config)."""
    text = hf_config.get_text_config(decoder=True)
    for key in _TOP_K_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise Refused(f"its config names the experts per token none of {', '.join(_TOP_K_KEYS)}")


def family_for(root: Path, config: dict) -> Family:
    """The family of the checkpoint folder `root` (whose parsed config.json is `config`)."""
    model_type = config.get("model_type")
    try:
        hf_config = AutoConfig.from_pretrained(root)
    except (ValueError, KeyError) as e:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not known to the installed transformers {transformers.__version__} ({e}); "
            "run `moeflow families` for the model types moeflow serves"
        ) from None
    return describe(hf_config)


class Refused(Exception):
    """Why a family cannot be served, in a phrase (`UnsupportedArchitectureError` wraps it for users)."""


def _refusal(model_type: str, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported by moeflow: {reason}. `moeflow families` lists every MoE "
        f"model type of the installed transformers ({transformers.__version__}) and whether moeflow serves it"
    )


def describe(hf_config: PreTrainedConfig) -> Family:
    """The family of `hf_config`, derived from transformers; UnsupportedArchitectureError says why not."""
    model = meta_model(hf_config)
    try:
        return describe_model(model)
    except Refused as e:
        raise _refusal(hf_config.model_type, str(e)) from None


def describe_model(model: nn.Module) -> Family:
    """`describe` of a model already built (on the meta device); `Refused` says why it cannot be served."""
    model_type = model.config.model_type
    modules = experts_modules(model)
    if not modules:
        raise Refused(unhooked_reason(model))
    layouts = {_layout(m) for m in modules.values()}
    if len(layouts) != 1:
        raise Refused(f"its MoE layers use different experts classes ({', '.join(sorted(map(str, layouts)))})")
    layout = layouts.pop()
    names = frozenset(n for n, _ in model.named_parameters(remove_duplicate=False)) | frozenset(
        n for n, _ in model.named_buffers()
    )
    expert_params = {}
    for prefix, module in model.named_modules():
        if prefix.endswith(".experts") and module in modules.values():
            for p in EXPERT_PARAMS:
                if getattr(module, p, None) is not None:
                    expert_params[f"{prefix}.{p}"] = (layer_index(prefix), p)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    _check_converters(model_type, converters, layout)
    return Family(
        model_type=model_type,
        layout=layout,
        top_k=routed_top_k(model.config),
        one_sequence_cache=_one_sequence_cache(model),
        _renamings=renamings,
        _converters=converters,
        _prefix=model.base_model_prefix,
        _names=names,
        _expert_params=expert_params,
    )


def _layout(module: nn.Module) -> ExpertsLayout:
    cls = type(module)
    if not module.has_gate:
        raise Refused(
            f"its experts ({cls.__name__}) have no gate projection (use_experts_implementation(has_gate=False): "
            "up_proj and an activation only), and moeflow's slots hold gate_up experts"
        )
    if module.has_post_expert_norm:
        raise Refused(
            f"its experts ({cls.__name__}) normalize each expert's output (has_post_expert_norm=True), which "
            "moeflow's experts kernel does not do"
        )
    if cls._apply_gate is _default_apply_gate:
        act = getattr(module.config, "hidden_act", None) or getattr(module.config, "hidden_activation", "silu")
        activation = f"{act}(gate) * up"
    else:
        activation = f"{cls.__name__}._apply_gate"
    return ExpertsLayout(
        experts_class=cls.__name__,
        transposed=bool(module.is_transposed),
        interleaved=not module.is_concatenated,
        has_bias=bool(module.has_bias),
        activation=activation,
    )


def _check_converters(model_type: str, converters: list, layout: ExpertsLayout) -> None:
    """Refuse converters moeflow cannot read per expert (anything beyond merge-then-concatenate)."""
    concat_dim = 2 if layout.transposed else 1
    for c in converters:
        targets = " ".join(c.target_patterns)
        ops = [type(op).__name__ for op in c.operations]
        expert_target = any(t.endswith(f"experts.{p}") for t in c.target_patterns for p in EXPERT_PARAMS)
        if not expert_target:  # a dense tensor transformers converts as it loads: `Family.convert_dense` runs it
            continue
        ok = isinstance(c.operations[0], MergeModulelist) and c.operations[0].dim == 0
        if len(c.operations) == 2:
            ok = ok and isinstance(c.operations[1], Concatenate) and c.operations[1].dim == concat_dim
        if not ok or len(c.operations) > 2:
            raise Refused(
                f"its checkpoint converter for {targets} uses {', '.join(ops)}; moeflow reads experts stored per "
                f"expert (MergeModulelist(dim=0), then Concatenate(dim={concat_dim})) or fused"
            )


def _one_sequence_cache(model: nn.Module) -> bool:
    from transformers.cache_utils import get_layer_types_and_kwargs

    if not model._supports_default_dynamic_cache():  # MiniMax: a cache class of its own
        return True
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return any(t not in ("full_attention", "dummy") for t in layer_types)


def unhooked_reason(model: nn.Module) -> str:
    """Why a model's experts cannot be served: what its experts are instead of `use_experts_implementation` modules."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "experts" or (type(module).__name__.endswith("Experts")):
            if isinstance(module, nn.ModuleList):
                kinds = sorted({type(m).__name__ for m in module})
                inner = ", ".join(kinds)
                return f"its experts are not behind use_experts_implementation: {name} is an nn.ModuleList of {inner}"
            return f"its experts are not behind use_experts_implementation: {name} is {type(module).__name__}"
    return (
        "its config builds no routed experts (no module behind use_experts_implementation): a dense model, or an "
        "MoE switch in its config is off"
    )

