"""Routing functions: router logits in, a flat list of (token, expert, weight) assignments out.

Every router returns the same record, `Routes`, whatever its rule (token choice with or without a
capacity, expert choice, sigmoid with a balancing bias), so the rest of the layer (order, dispatch,
experts, combine, restore) never looks at the routing rule.

Shapes: the project legend (moeflow/__init__.py). P counts the routed (token, expert) assignments:
T*K for dropless top-k, fewer after drops, E*C for expert choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class Routes:
    """One batch's routing decision. `aux_loss` is already scaled by its coefficient: add it to the loss."""

    token_ids_P: Tensor  # int64, which token each assignment moves
    expert_ids_P: Tensor  # int64, global expert index
    weights_P: Tensor  # float32, combine weight, differentiable w.r.t. the router logits
    aux_loss: Tensor  # float32 scalar
    tokens_per_expert_E: Tensor  # int64, assignments kept per expert (the load)


@dataclass(frozen=True, kw_only=True)
class TopKSoftmax:
    """GShard / Mixtral token choice: softmax over experts, each token takes its top-k.

    `capacity_factor=None` is dropless (Mixtral). Otherwise each expert keeps at most
    C = ceil(capacity_factor * T * K / E) assignments, first choices of all tokens before second
    choices (GShard's priority), token order within a choice; the rest are dropped.
    The auxiliary loss is the Switch/GShard balance loss E * sum_e (count_e / T) * mean_prob_e
    (transformers' `load_balancing_loss_func` for one layer), plus an optional router z-loss.
    """

    k: int = 2
    capacity_factor: float | None = None
    normalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def route(self, logits_TE: Tensor, bias_E: Tensor | None = None) -> Routes:
        return _token_choice(
            logits_TE,
            k=self.k,
            capacity_factor=self.capacity_factor,
            normalize=self.normalize,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
        )


@dataclass(frozen=True, kw_only=True)
class SwitchTop1:
    """Switch Transformer: top-1, weight = the chosen expert's probability (not renormalised),
    capacity C = ceil(capacity_factor * T / E) with overflow dropped in token order."""

    capacity_factor: float | None = 1.25
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def route(self, logits_TE: Tensor, bias_E: Tensor | None = None) -> Routes:
        return _token_choice(
            logits_TE,
            k=1,
            capacity_factor=self.capacity_factor,
            normalize=False,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
        )


@dataclass(frozen=True, kw_only=True)
class ExpertChoice:
    """Expert choice (Zhou et al. 2022): each expert takes its C = ceil(capacity_factor * T / E)
    highest-scoring tokens (softmax over experts); balanced by construction, so no auxiliary loss.
    A token may be taken by several experts or by none."""

    capacity_factor: float = 2.0

    def route(self, logits_TE: Tensor, bias_E: Tensor | None = None) -> Routes:
        num_tokens, num_experts = logits_TE.shape
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        capacity = min(num_tokens, math.ceil(self.capacity_factor * num_tokens / num_experts))
        weights_EC, token_ids_EC = probs_TE.t().topk(capacity, dim=1)
        expert_ids_EC = torch.arange(num_experts, device=logits_TE.device)[:, None].expand_as(token_ids_EC)
        return Routes(
            token_ids_P=token_ids_EC.reshape(-1),
            expert_ids_P=expert_ids_EC.reshape(-1),
            weights_P=weights_EC.reshape(-1),
            aux_loss=logits_TE.new_zeros((), dtype=torch.float32),
            tokens_per_expert_E=torch.full((num_experts,), capacity, dtype=torch.int64, device=logits_TE.device),
        )


@dataclass(frozen=True, kw_only=True)
class SigmoidBias:
    """DeepSeek-V3: sigmoid scores; experts are *selected* by score + bias (optionally within the
    best `topk_groups` of `num_groups` expert groups, a group scored by its two best experts) but
    *weighted* by the plain scores, normalised over the top-k and scaled by `routed_scaling`.

    The bias is the auxiliary-loss-free balancer: after each step it moves by `bias_update_rate`
    towards under-loaded experts (`update_bias`). `seq_aux_coef` adds DeepSeek-V3's small
    complementary balance loss, computed over the whole batch as one sequence.
    """

    k: int = 2
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    bias_update_rate: float = 1e-3
    seq_aux_coef: float = 0.0

    def route(self, logits_TE: Tensor, bias_E: Tensor | None = None) -> Routes:
        num_tokens, num_experts = logits_TE.shape
        if num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide the {num_experts} experts")
        scores_TE = torch.sigmoid(logits_TE.float())
        select_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E.float()
        if self.num_groups > 1:
            per_group = num_experts // self.num_groups
            grouped = select_TE.view(num_tokens, self.num_groups, per_group)
            group_score_TG = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            best_groups_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
            select_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), float("-inf"))
        topk_ids_TK = select_TE.topk(self.k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_ids_TK)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True) * self.routed_scaling
        counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts)
        aux_loss = logits_TE.new_zeros((), dtype=torch.float32)
        if self.seq_aux_coef:
            frac_E = counts_E.float() * num_experts / (self.k * num_tokens)
            mean_score_E = (scores_TE / scores_TE.sum(-1, keepdim=True)).mean(0)
            aux_loss = self.seq_aux_coef * (frac_E * mean_score_E).sum()
        return Routes(
            token_ids_P=torch.arange(num_tokens, device=logits_TE.device).repeat_interleave(self.k),
            expert_ids_P=topk_ids_TK.reshape(-1),
            weights_P=weights_TK.reshape(-1),
            aux_loss=aux_loss,
            tokens_per_expert_E=counts_E,
        )

    def update_bias(self, bias_E: Tensor, load_E: Tensor) -> None:
        """In place: raise the bias of experts below the mean load, lower it above (sign rule)."""
        load_E = load_E.float()
        bias_E.add_(self.bias_update_rate * torch.sign(load_E.mean() - load_E))


RoutingConfig = TopKSoftmax | SwitchTop1 | ExpertChoice | SigmoidBias


def _token_choice(
    logits_TE: Tensor,
    *,
    k: int,
    capacity_factor: float | None,
    normalize: bool,
    aux_loss_coef: float,
    z_loss_coef: float,
) -> Routes:
    num_tokens, num_experts = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    top_probs_TK, topk_ids_TK = probs_TE.topk(k, dim=-1)
    weights_TK = top_probs_TK / top_probs_TK.sum(-1, keepdim=True) if normalize else top_probs_TK
    chosen_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts)
    aux_loss = aux_loss_coef * num_experts * (chosen_E.float() / num_tokens * probs_TE.mean(0)).sum()
    if z_loss_coef:
        aux_loss = aux_loss + z_loss_coef * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
    token_ids_P = torch.arange(num_tokens, device=logits_TE.device).repeat_interleave(k)
    expert_ids_P = topk_ids_TK.reshape(-1)
    weights_P = weights_TK.reshape(-1)
    tokens_per_expert_E = chosen_E
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
        # Priority: every token's first choice, then every token's second choice, ... (k-major).
        position_KT = _position_in_expert(topk_ids_TK.t().reshape(-1), num_experts).view(k, num_tokens)
        keep_P = (position_KT < capacity).t().reshape(-1)
        token_ids_P, expert_ids_P, weights_P = token_ids_P[keep_P], expert_ids_P[keep_P], weights_P[keep_P]
        tokens_per_expert_E = torch.bincount(expert_ids_P, minlength=num_experts)
    return Routes(
        token_ids_P=token_ids_P,
        expert_ids_P=expert_ids_P,
        weights_P=weights_P,
        aux_loss=aux_loss,
        tokens_per_expert_E=tokens_per_expert_E,
    )


def _position_in_expert(expert_ids_N: Tensor, num_experts: int) -> Tensor:
    """For each entry, how many earlier entries chose the same expert (0 for the first)."""
    order_N = torch.argsort(expert_ids_N, stable=True)
    counts_E = torch.bincount(expert_ids_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_sorted_N = torch.arange(expert_ids_N.numel(), device=expert_ids_N.device) - starts_E[expert_ids_N[order_N]]
    return torch.empty_like(expert_ids_N).scatter_(0, order_N, rank_in_sorted_N)


__all__ = ["ExpertChoice", "Routes", "RoutingConfig", "SigmoidBias", "SwitchTop1", "TopKSoftmax"]
