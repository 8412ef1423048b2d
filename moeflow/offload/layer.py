"""`apply_offload(model, cache)`: the pass that moves a transformers MoE model's experts into the cache.

transformers 5 dispatches every supported family's experts through `@use_experts_implementation`.
We register one experts function, "moeflow", and bind each experts module to its layer and the
cache. Model code is untouched. Shapes: the legend in `moeflow`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate

from moeflow.events import Listeners
from moeflow.kernels import experts_forward, experts_rows, pair_hidden, pair_row, weighted_sum
from moeflow.kernels.quant import quantized_experts_forward, slot_halves
from moeflow.kernels.quant_moe import TRITON_KINDS, quant_fused_moe
from moeflow.model.families import experts_modules
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.plans import RoutingEvent, RoutingPlan

IMPLEMENTATION = "moeflow"

@dataclass
class OffloadRuntime:
    """What every offloaded experts module shares: the cache, and who listens to the routing
    (the prefetcher's corrections, predictors, the step driver's record of each forward)."""

    cache: ExpertCache
    routing: Listeners[RoutingEvent] = field(default_factory=Listeners)
    packed: bool = True  # int8/int4 slots on the CPU: torch's packed matmuls (False: dequantize, exact)
    triton: bool = False  # every slot through the fused Triton kernels (`EngineConfig.kernels`)
    exact: bool = True  # False: full-precision slots on the CPU by `kernels.cpu.cpu_plan`, within fp32 rounding
    # Quantized slots: one expert dequantized at a time, in the compute dtype (working memory beside the
    # budget, like the activations; 18 MiB for the I/O-bound benchmark model's experts in fp32).
    _scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def scratch_for(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantization buffers (gate_up [2I, D], down [D, I]) in x's dtype and device."""
        pool = self.cache.pool
        s = self._scratch
        if s is None or s[0].dtype != x_TD.dtype or s[0].device != x_TD.device:
            s = self._scratch = (
                torch.empty(2 * pool.inter, pool.hidden, dtype=x_TD.dtype, device=x_TD.device),
                torch.empty(pool.hidden, pool.inter, dtype=x_TD.dtype, device=x_TD.device),
            )
        return s


def apply_offload(
    model: nn.Module, cache: ExpertCache, *, packed: bool = True, triton: bool = False, exact: bool = True
) -> OffloadRuntime:
    """Route `model`'s experts through `cache`. The experts' weight matrices are dropped; expert biases
    (gpt-oss) stay resident on the module, like the router (E x (2I + D) values a layer). `packed`: as
    `moeflow.kernels.quant.quantized_experts_forward` takes it. `triton`: slots computed by the fused Triton
    kernels where they apply (no expert biases; full precision: transformers' SiLU gate, which they fuse).
    `exact=False`: full-precision slots on the CPU computed by the fastest measured formulation
    (`kernels.experts_rows(exact=False)`), not bit for bit transformers' arithmetic."""
    runtime = OffloadRuntime(cache=cache, packed=packed, triton=triton, exact=exact)
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
    # One host sync: the distinct expert ids the cache must provide for this step (one token's K ids in Python:
    # cheaper than torch.unique at decode's sizes).
    one_token = top_k_index_TK.shape[0] == 1
    token_experts = top_k_index_TK[0].tolist() if one_token else None
    expert_ids = sorted(set(token_experts)) if token_experts is not None else torch.unique(top_k_index_TK).tolist()
    plan = RoutingPlan(layer=layer, expert_ids=tuple(expert_ids), num_tokens=hidden_TD.shape[0])
    if runtime.routing:
        event = RoutingEvent(plan=plan, top_k_index_TK=top_k_index_TK, top_k_weights_TK=top_k_weights_TK)
        runtime.routing.publish(event)
    pool = runtime.cache.pool
    on_cpu = hidden_TD.device.type == "cpu"
    silu_gate = type(self)._apply_gate is _default_apply_gate and isinstance(self.act_fn, (nn.SiLU, SiLUActivation))

    def compute(slot_of: dict[int, int], weights_TK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts of `slot_of` on their pairs: the layer's output part (`weights_TK`), or with None the
        pairs' rows before their routing weights (CPU); and the pairs' slot ids (-1: another batch's)."""
        if token_experts is not None:  # one token: its K slots looked up in Python
            slot_ids_TK = torch.tensor([[slot_of.get(e, -1) for e in token_experts]], device=top_k_index_TK.device)
        else:
            lut_E = torch.full((self.num_experts,), -1, dtype=torch.long, device=top_k_index_TK.device)
            lut_E[list(slot_of)] = torch.tensor(list(slot_of.values()), device=top_k_index_TK.device)
            slot_ids_TK = lut_E[top_k_index_TK]
        biases = None
        if self.has_bias:  # the wave's experts' resident biases, by slot
            experts = torch.tensor(list(slot_of), device=top_k_index_TK.device)
            slots = torch.tensor(list(slot_of.values()), device=top_k_index_TK.device)
            S = pool.capacity
            biases = (
                self.gate_up_proj_bias.new_zeros(S, self.gate_up_proj_bias.shape[1]).index_copy_(
                    0, slots, self.gate_up_proj_bias[experts]
                ),
                self.down_proj_bias.new_zeros(S, self.down_proj_bias.shape[1]).index_copy_(
                    0, slots, self.down_proj_bias[experts]
                ),
            )
        if pool.fmt is not None:  # quantized or cast slots: packed matmuls, or each used slot dequantized
            if (hidden_TD.is_cuda or runtime.triton) and pool.fmt.kind in TRITON_KINDS:
                # On a GPU, int8/int4/fp8/mxfp4 slots go through the Triton kernels: dequantization fused into the
                # grouped GEMM.
                out = quant_fused_moe(hidden_TD, pool.quantized(), weights_TK, slot_ids_TK, gate=self._apply_gate,
                                      biases=biases)  # fmt: skip
                return out, slot_ids_TK
            out = quantized_experts_forward(
                hidden_TD, pool.quantized(), weights_TK, slot_ids_TK, gate=self._apply_gate, biases=biases,
                scratch=runtime.scratch_for(hidden_TD), packed=runtime.packed,
            )  # fmt: skip
            return out, slot_ids_TK
        if weights_TK is None:
            out = experts_rows(hidden_TD, pool.gate_up_S2ID, pool.down_SDI, slot_ids_TK, gate=self._apply_gate,
                               biases=biases, exact=runtime.exact)  # fmt: skip
            return out, slot_ids_TK
        if runtime.triton and biases is None and silu_gate:  # kernels.fused_moe: the fused Triton kernels
            return experts_forward(hidden_TD, pool.gate_up_S2ID, pool.down_SDI, weights_TK, slot_ids_TK,
                                   exact=False), slot_ids_TK  # fmt: skip
        out = experts_forward(hidden_TD, pool.gate_up_S2ID, pool.down_SDI, weights_TK, slot_ids_TK,
                              gate=self._apply_gate, biases=biases)  # fmt: skip
        return out, slot_ids_TK

    def compute_arrivals(batches: Iterator[dict[int, int]]) -> torch.Tensor:
        """On the CPU, each batch of experts as it lands (the first: those resident), its pairs' rows kept,
        and one weighted sum at the end: bit for bit the all-at-once result (`kernels.experts_rows`), while
        the readers bring the rest. On a GPU reads are asynchronous copies already, and the Triton kernels
        weight and sum inside: all at once."""
        if not on_cpu or runtime.triton:
            slot_of: dict[int, int] = {}
            for ready in batches:
                slot_of.update(ready)
            return compute(slot_of, top_k_weights_TK)[0]
        rows_PD = None
        for ready in batches:
            part_PD, slot_ids_TK = compute(ready, None)
            rows_PD = part_PD if rows_PD is None else torch.where(slot_ids_TK.reshape(-1, 1) >= 0, part_PD, rows_PD)
        assert rows_PD is not None, "a wave has at least one expert"
        return weighted_sum(rows_PD, top_k_weights_TK, hidden_TD.dtype)

    if token_experts is not None and on_cpu and not runtime.triton and not self.has_bias and (
            pool.fmt is not None or runtime.exact):  # fmt: skip
        halves = _pair_halves(pool, hidden_TD, self._apply_gate, runtime)
        compute_token, on_gate_up = _one_token(hidden_TD, token_experts, top_k_weights_TK, *halves)
        return serve_layer(runtime.cache, plan, compute_token, on_gate_up if runtime.cache.early_gate_up else None)
    return serve_layer(runtime.cache, plan, compute_arrivals)


def _pair_halves(
    pool: SlotPool, x_1D: torch.Tensor, gate: Callable | None, runtime: OffloadRuntime | None
) -> tuple[Callable[[int, torch.Tensor], torch.Tensor], Callable[[int, torch.Tensor], torch.Tensor]]:
    """A pair's row on the CPU in two halves, from slot s: (s, x) -> the gate/up product through the gate, and
    (s, that) -> the row; the halves of the exact path (`kernels.pair_hidden`) for full-precision slots, of
    `quantized_experts_forward`'s for quantized ones (`kernels.quant.slot_halves`), bit for bit."""
    if pool.fmt is None:
        return (lambda s, x: pair_hidden(x, pool.gate_up_S2ID[s], gate=gate),
                lambda s, h: pair_row(h, pool.down_SDI[s]))  # fmt: skip
    return slot_halves(pool.quantized(), x_1D, gate=gate, scratch=runtime.scratch_for(x_1D), packed=runtime.packed)


def _one_token(
    x_1D: torch.Tensor,
    token_experts: list[int],
    weights_1K: torch.Tensor,
    pair_hidden: Callable[[int, torch.Tensor], torch.Tensor],
    pair_row: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[Callable[[Iterator[dict[int, int]]], torch.Tensor], Callable[[int, int], None]]:
    """One token's layer on the CPU (no expert biases; `_pair_halves`): each expert's gate/up half is computed as
    soon as its gate/up matrices are in (the second callable, `serve_layer`'s `on_gate_up`, where large experts'
    reads reply early: `ExpertCache.early_gate_up`), while its down matrix is read, and its down half once it has
    landed (the first, `compute`). The rows are `compute_arrivals`' bit for bit, with less around them (no slot-id
    tensor, no merge of batches' rows); experts of another wave give zero rows."""
    hidden: dict[int, torch.Tensor] = {}

    def on_gate_up(e: int, s: int) -> None:
        hidden[e] = pair_hidden(s, x_1D)

    def compute(batches: Iterator[dict[int, int]]) -> torch.Tensor:
        rows: dict[int, torch.Tensor] = {}
        for ready in batches:
            for e, s in ready.items():
                h = hidden.pop(e, None)
                rows[e] = pair_row(s, pair_hidden(s, x_1D) if h is None else h)
        zero = None
        if len(rows) < len(token_experts):
            zero = x_1D.new_zeros(1, x_1D.shape[1])
        return weighted_sum(torch.cat([rows.get(e, zero) for e in token_experts]), weights_1K, x_1D.dtype)

    return compute, on_gate_up


def serve_layer(
    cache: ExpertCache,
    plan: RoutingPlan,
    compute: Callable[[Iterator[dict[int, int]]], torch.Tensor] | None = None,
    on_gate_up: Callable[[int, int], None] | None = None,
) -> torch.Tensor | None:
    """The per-layer cache protocol, shared by the live forward and profiling replay.

    The layer's run is announced to the policy's clock (`ExpertCache.begin_layer`). Its experts are split into
    waves that fit the pool, resident ones first so they stay; each wave is acquired (hits, demand reads, waits
    for prefetches in flight) and, when `compute` is given, computed from its slots as they arrive (batches of
    expert -> slot, `ExpertCache.arrivals`, which hands `on_gate_up` the experts whose gate/up matrices are in
    before the rest); the waves' outputs are summed in order. Replay passes no `compute`: it counts exactly what a
    live run with the same routing counts.
    """
    cache.begin_layer(plan.layer)
    resident = cache.resident()
    ordered = sorted(plan.expert_ids, key=lambda e: (plan.layer, e) not in resident)
    cap = cache.pool.capacity
    out = None
    for i in range(0, len(ordered), cap):
        with cache.arrivals(plan.layer, ordered[i : i + cap], on_gate_up) as batches:
            if compute is None:
                for _ in batches:
                    pass
                continue
            part = compute(batches)
            out = part if out is None else out + part
    return out
