"""Language models with expert-parallel MoE layers, applied as a pass.

`apply_expert_parallel(model, group)` swaps every transformers Mixtral-style sparse MoE block (a
`gate` router with weight [E, D] and `experts` with fused `gate_up_proj [E, 2I, D]` /
`down_proj [E, D, I]`) for a `MoELayer` holding this rank's slice of the same weights. The model's
own code is untouched; its forward now runs the overlapped all-to-all. Since the HF model no
longer sees router logits, the balance loss comes from `moe_aux_loss(model)`.

A training step is forward, `loss + moe_aux_loss(model)`, backward, gradient averaging, optimizer step;
`update_routing_bias_every_step(model, optimizer)` hooks the end of the step, where DeepSeek-V3's
auxiliary-loss-free balancer (a `SigmoidBias` router) moves its bias by the step's load:

    layers = apply_expert_parallel(model, group, routing=SigmoidBias(k=8, num_groups=8, topk_groups=4))
    optimizer = torch.optim.AdamW(model.parameters())
    update_routing_bias_every_step(model, optimizer)
"""

from __future__ import annotations

from moeflow.training.experts import ExpertBackend
from moeflow.training.moe_layer import MoELayer, MoELayerConfig
from moeflow.training.routing import RoutingConfig, TopKSoftmax
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle


def _is_sparse_moe_block(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        isinstance(getattr(gate, "weight", None), Tensor)
        and isinstance(getattr(experts, "gate_up_proj", None), Tensor)
        and isinstance(getattr(experts, "down_proj", None), Tensor)
        and hasattr(module, "top_k")
    )


def moe_layer_from_block(
    block: nn.Module,
    group: ProcessGroup | None,
    *,
    routing: RoutingConfig | None = None,
    num_chunks: int | None = None,
    max_chunks: int = 8,
    expert_backend: ExpertBackend = "auto",
    aux_loss_coef: float = 0.0,
) -> MoELayer:
    """A MoELayer computing what `block` computes (default routing: Mixtral's renormalised top-k,
    dropless), holding this rank's experts."""
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError("router jitter noise is not supported; set config.router_jitter_noise = 0")
    gate_up_E2ID, down_EDI = block.experts.gate_up_proj, block.experts.down_proj
    num_experts, two_i, hidden = gate_up_E2ID.shape
    config = MoELayerConfig(
        hidden_size=hidden,
        expert_hidden_size=two_i // 2,
        num_experts=num_experts,
        routing=routing or TopKSoftmax(k=block.top_k, normalize=True, aux_loss_coef=aux_loss_coef),
        num_chunks=num_chunks,
        max_chunks=max_chunks,
        expert_backend=expert_backend,
    )
    layer = MoELayer(config, group).to(device=gate_up_E2ID.device, dtype=gate_up_E2ID.dtype)
    layer.gate.weight.data.copy_(block.gate.weight.data)
    layer.load_full_experts(gate_up_E2ID.data, down_EDI.data)
    return layer


def apply_expert_parallel(
    model: nn.Module,
    group: ProcessGroup | None,
    *,
    routing: RoutingConfig | None = None,
    num_chunks: int | None = None,
    max_chunks: int = 8,
    expert_backend: ExpertBackend = "auto",
) -> list[MoELayer]:
    """Replace the model's sparse MoE blocks in place; returns the new layers in model order.
    The balance loss coefficient is taken from `model.config.router_aux_loss_coef` when present."""
    coef = float(getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)
    targets = [(name, module) for name, module in model.named_modules() if _is_sparse_moe_block(module)]
    if not targets:
        raise ValueError("the model has no sparse MoE block (a `gate` router plus fused `experts`) to replace")
    layers = []
    for name, block in targets:
        parent_name, _, child_name = name.rpartition(".")
        layer = moe_layer_from_block(
            block,
            group,
            routing=routing,
            num_chunks=num_chunks,
            max_chunks=max_chunks,
            expert_backend=expert_backend,
            aux_loss_coef=coef,
        )
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
        layers.append(layer)
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the MoE layers' auxiliary losses from the last forward (coefficients applied)."""
    return sum((layer.aux_loss for layer in moe_layers(model)), start=next(model.parameters()).new_zeros(()))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in moe_layers(model) for p in layer.expert_parameters()]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that all ranks hold a copy of (to be averaged across ranks)."""
    experts = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if id(p) not in experts]


def update_routing_bias(model: nn.Module) -> None:
    """End of step for every MoE layer (the sigmoid rule's balancing bias; load counters reset).
    Collective over each layer's group: every rank calls it at the same point."""
    for layer in moe_layers(model):
        layer.update_bias()


def update_routing_bias_every_step(model: nn.Module, optimizer: Optimizer) -> RemovableHandle:
    """Run `update_routing_bias(model)` after every `optimizer.step()`: the load the layers counted
    since the previous step (all micro-batches, all ranks) moves each `SigmoidBias` router's bias
    towards the under-loaded experts before the next step routes. Works inside DeepSpeed's engine,
    which steps the optimizer it wraps. Returns the hook's handle (`.remove()` detaches it)."""
    if not moe_layers(model):
        raise ValueError("the model has no MoELayer; apply training.lm.apply_expert_parallel first")
    return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: update_routing_bias(model))
