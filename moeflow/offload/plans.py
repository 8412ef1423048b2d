"""Small frozen records that cross the seams between router, cache, transfer engine and predictors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.model.checkpoint import ExpertKey


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingPlan:
    """What one MoE layer's router chose for the current step (after the host sync)."""

    layer: int
    expert_ids: tuple[int, ...]  # distinct experts the step needs, ascending
    num_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefetchPlan:
    """Experts to bring into the fast tier ahead of need, most urgent first."""

    keys: tuple[ExpertKey, ...]

    def __post_init__(self) -> None:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("PrefetchPlan.keys must not repeat an expert")


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingEvent:
    """One MoE layer's routing in one forward, published to the offload runtime's listeners before the
    layer acquires its experts: the plan and the router's top-k ids and weights [T, K]."""

    plan: RoutingPlan
    top_k_index_TK: torch.Tensor
    top_k_weights_TK: torch.Tensor
