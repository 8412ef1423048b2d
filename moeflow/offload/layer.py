"""`apply_offload(model, cache)`: the pass that moves a transformers MoE model's experts into the cache.

transformers 5 dispatches every supported family's experts through `@use_experts_implementation`.
We register one experts function, "moeflow", and bind each experts module to its layer and the
cache. Model code is untouched. Shapes: the legend in `moeflow`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeflow.events import Listeners
from moeflow.model.loading import experts_modules
from moeflow.offload.cache import ExpertCache
from moeflow.offload.plans import RoutingEvent, RoutingPlan

IMPLEMENTATION = "moeflow"

RoutingListener = Callable[[RoutingEvent], None]


@dataclass
class OffloadRuntime:
    """What every offloaded experts module shares: the cache, and who listens to the routing
    (the prefetcher's corrections, predictors, the step driver's record of each forward)."""

    cache: ExpertCache
    routing: Listeners[RoutingEvent] = field(default_factory=Listeners)


def apply_offload(model: nn.Module, cache: ExpertCache) -> OffloadRuntime:
    """Route `model`'s experts through `cache`. The experts' own parameters are dropped."""
    runtime = OffloadRuntime(cache=cache)
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)
    for layer, module in experts_modules(model).items():
        for name in ("gate_up_proj", "down_proj"):
            module._parameters.pop(name, None)
            setattr(module, name, None)
        module._moeflow_layer = layer
        module._moeflow_runtime = runtime
    model.set_experts_implementation(IMPLEMENTATION)
    return runtime


def offloaded_experts_forward(
    self: nn.Module, hidden_TD: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
) -> torch.Tensor:
    runtime: OffloadRuntime = self._moeflow_runtime
    layer = self._moeflow_layer
    # One host sync: the distinct expert ids the cache must provide for this step.
    expert_ids = torch.unique(top_k_index_TK).tolist()
    plan = RoutingPlan(layer=layer, expert_ids=tuple(expert_ids), num_tokens=hidden_TD.shape[0])
    if runtime.routing:
        event = RoutingEvent(plan=plan, top_k_index_TK=top_k_index_TK, top_k_weights_TK=top_k_weights_TK)
        runtime.routing.publish(event)
    pool = runtime.cache.pool

    def compute(slot_of: dict[int, int]) -> torch.Tensor:
        lut_E = torch.full((self.num_experts,), -1, dtype=torch.long, device=top_k_index_TK.device)
        lut_E[torch.tensor(list(slot_of), device=lut_E.device)] = torch.tensor(
            list(slot_of.values()), device=lut_E.device
        )
        slot_ids_TK = lut_E[top_k_index_TK]
        return grouped_experts(self, hidden_TD, pool.gate_up_S2ID, pool.down_SDI, top_k_weights_TK, slot_ids_TK)

    return serve_layer(runtime.cache, plan, compute)


def serve_layer(
    cache: ExpertCache, plan: RoutingPlan, compute: Callable[[dict[int, int]], torch.Tensor] | None = None
) -> torch.Tensor | None:
    """The per-layer cache protocol, shared by the live forward and profiling replay.

    The layer's experts are split into waves that fit the pool, resident ones first so they stay;
    each wave is acquired (hits, demand reads, waits for prefetches in flight) and, when `compute`
    is given, computed from its slots (expert -> slot); the waves' outputs are summed in order.
    Replay passes no `compute`: it counts exactly what a live run with the same routing counts.
    """
    resident = cache.resident()
    ordered = sorted(plan.expert_ids, key=lambda e: (plan.layer, e) not in resident)
    cap = cache.pool.capacity
    out = None
    for i in range(0, len(ordered), cap):
        with cache.acquire(plan.layer, ordered[i : i + cap]) as slot_of:
            if compute is not None:
                part = compute(slot_of)
                out = part if out is None else out + part
    return out


def grouped_experts(
    module: nn.Module,
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor,
    slot_ids_TK: torch.Tensor,
) -> torch.Tensor:
    """Expert MLPs read straight from the slot pool; (token, k) pairs whose slot id is -1 contribute 0.

    Same arithmetic as transformers' grouped_mm experts (sort by slot, grouped GEMMs, weight,
    restore order, sum over k in order), so outputs match it to the last bit on the CPU.
    """
    T, K = slot_ids_TK.shape
    if T == 1 and not hidden_TD.is_cuda:
        # Decoding one sequence: a token's K experts differ, so every group is one row, and grouped_mm
        # runs one torch.mm per group; calling torch.mm per pair is the same arithmetic without the
        # sort (bit-identical in fp32/bf16/fp16, kernels' bench: 0.09 vs 0.23 ms at the default model).
        y_KD = hidden_TD.new_zeros(K, hidden_TD.shape[-1], dtype=gate_up_S2ID.dtype)
        x_1D = hidden_TD.to(gate_up_S2ID.dtype)
        for k, s in enumerate(slot_ids_TK[0].tolist()):  # host sync: the slots to read
            if s >= 0:
                y_KD[k] = (module._apply_gate(x_1D @ gate_up_S2ID[s].t()) @ down_SDI[s].t())[0]
        return (y_KD * weights_TK.reshape(-1, 1)).view(1, K, -1).sum(dim=1).to(hidden_TD.dtype)
    S = gate_up_S2ID.shape[0]
    flat_ids = slot_ids_TK.reshape(-1)
    valid = flat_ids >= 0
    sorted_ids, perm = torch.sort(torch.where(valid, flat_ids, S))
    n_valid = int(valid.sum())  # host sync: rows that belong to this wave
    sorted_ids, perm = sorted_ids[:n_valid], perm[:n_valid]
    x_ND = hidden_TD[perm // K]
    offsets_S = torch.cumsum(torch.bincount(sorted_ids, minlength=S), dim=0, dtype=torch.int32)
    h_N2I = torch.nn.functional.grouped_mm(x_ND.to(gate_up_S2ID.dtype), gate_up_S2ID.transpose(-2, -1), offs=offsets_S)
    h_NI = module._apply_gate(h_N2I)
    y_ND = torch.nn.functional.grouped_mm(h_NI, down_SDI.transpose(-2, -1), offs=offsets_S)
    y_ND = y_ND * weights_TK.reshape(-1)[perm].unsqueeze(-1)
    out_TKD = torch.zeros(T * K, hidden_TD.shape[-1], dtype=y_ND.dtype, device=y_ND.device)
    out_TKD[perm] = y_ND
    return out_TKD.view(T, K, -1).sum(dim=1).to(hidden_TD.dtype)
