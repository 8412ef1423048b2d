"""Where things are inside a transformers MoE decoder: the token embedding, each MoE layer's pre-MoE
norm and router, the final norm and output head. Code above the model layer asks here instead of
walking `model.model.layers`.

Found the same way for every family: the MoE block is the experts module's parent; its router is the
block's first submodule (not the experts, not shared experts) holding a [E, D] weight (`gate`,
`router`, `gate.wg`, ...); the norm is the decoder
layer's norm that feeds the feed-forward block (`post_attention_layernorm`, `pre_ff_layernorm`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.errors import MoeflowError

# The names transformers' decoder layers give the norm in front of their feed-forward (MoE) block.
# Sandwich-norm layers (afmoe) have both a post-attention and a pre-MLP norm: the pre-MLP one comes first.
# Parallel blocks (cohere2_moe) feed attention and MoE from the input norm: the last resort.
PRE_MOE_NORMS = ("pre_mlp_layernorm", "pre_feedforward_layernorm", "pre_ff_layernorm", "ffn_norm",
                 "post_attention_layernorm", "post_attention_norm", "input_layernorm")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MoeLayerParts:
    layer: int
    norm: nn.Module  # the norm whose input is the residual entering the MoE block (after attention)
    router_weight_ED: torch.Tensor
    router_bias_E: torch.Tensor | None  # DeepSeek-V3-style selection bias of sigmoid routing


def token_embedding(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def output_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the final norm, the output projection to the vocabulary): what turns a residual into next-token logits."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise MoeflowError(f"{type(model).__name__} has no final norm (model.norm) and output head found")
    return norm, head


def moe_layer_parts(model: nn.Module, layer: int) -> MoeLayerParts:
    block = model.model.layers[layer]
    moe, experts = _moe_block(block)
    norm = next((getattr(block, n) for n in PRE_MOE_NORMS if isinstance(getattr(block, n, None), nn.Module)), None)
    router = None
    if moe is not None:  # the first [E, D] weight in the block outside the experts and shared experts
        for name, child in moe.named_modules():
            w = getattr(child, "weight", None)
            inside = child is experts or name.startswith("experts.") or "shared" in name
            if not inside and isinstance(w, torch.Tensor) and w.dim() == 2 and len(w) == experts.num_experts:
                router = child
                break
    if router is None or norm is None:
        raise MoeflowError(
            f"layer {layer}'s router (a [experts, hidden] weight beside its experts) and pre-MoE norm (one of "
            f"{', '.join(PRE_MOE_NORMS)}) were not found: {type(block).__name__} has no such pair"
        )
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        bias = getattr(moe, "e_score_correction_bias", None)
    return MoeLayerParts(layer=layer, norm=norm, router_weight_ED=router.weight, router_bias_E=bias)


def _moe_block(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(the MoE block, its experts module) inside decoder layer `block`."""
    for name, module in block.named_modules():
        if name.endswith("experts") and hasattr(module, "num_experts") and hasattr(module, "_apply_gate"):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            return parent, module
    return None, None
