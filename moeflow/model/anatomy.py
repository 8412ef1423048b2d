"""Where things are inside a transformers MoE decoder: the token embedding, each MoE layer's pre-MoE
norm and router. Code above the model layer asks here instead of walking `model.model.layers`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.errors import MoeflowError


@dataclass(frozen=True, kw_only=True)
class MoeLayerParts:
    layer: int
    norm: nn.Module  # the norm whose input is the residual entering the MoE block (after attention)
    router_weight_ED: torch.Tensor
    router_bias_E: torch.Tensor | None  # DeepSeek-V3-style selection bias of sigmoid routing


def token_embedding(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def moe_layer_parts(model: nn.Module, layer: int) -> MoeLayerParts:
    block = model.model.layers[layer]
    gate = getattr(block.mlp, "gate", None)
    norm = getattr(block, "post_attention_layernorm", None)
    if gate is None or norm is None or not hasattr(gate, "weight"):
        raise MoeflowError(
            f"layer {layer}'s router (mlp.gate) and post_attention_layernorm were not found: "
            f"{type(block).__name__} has no such pair"
        )
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is None:
        bias = getattr(block.mlp, "e_score_correction_bias", None)
    return MoeLayerParts(layer=layer, norm=norm, router_weight_ED=gate.weight, router_bias_E=bias)
