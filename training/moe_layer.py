"""The MoE layer for training: route -> order -> dispatch -> experts -> combine -> restore order.

    x_TD ─ gate ─▶ logits_TE ─ routing rule ─▶ Routes (token, expert, weight) x P
         ─ order (sort by chunk, expert; count exchange) ─▶ x_PD
         ─ dispatch (all-to-all) ─▶ experts ─▶ combine (all-to-all) ─▶ y_PD      [pipelined over d chunks]
         ─ restore (weight, sum back into tokens) ─▶ out_TD

Parameter names match transformers' Mixtral block (`gate.weight`, `experts.gate_up_proj`,
`experts.down_proj`), so a block's weights load directly; with a group of R ranks, `experts`
holds only this rank's E/R experts. With no group the layer is the single-process reference and
runs the same code with no-op all-to-alls.

Shapes: the project legend (moeflow/__init__.py): P routed assignments, X = E / R experts on this rank;
d is the number of chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeflow.training.dispatch import plan_dispatch, restore
from moeflow.training.expert_parallel import ExpertComm
from moeflow.training.experts import ExpertBackend, select_expert_fn
from moeflow.training.overlap import ExchangeContext, pipelined_exchange
from moeflow.training.profile_split import SplitProfile, profile_split
from moeflow.training.routing import Routes, RoutingConfig, SigmoidBias, TopKSoftmax
from moeflow.training.timeline import Timeline
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class MoELayerConfig:
    hidden_size: int  # D
    expert_hidden_size: int  # I
    num_experts: int  # E
    routing: RoutingConfig = field(default_factory=TopKSoftmax)
    num_chunks: int | None = None  # d; None: online profiling picks it (always 1 on a single rank)
    max_chunks: int = 8
    expert_backend: ExpertBackend = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.num_chunks is not None and self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1 or None (profiled), got {self.num_chunks}")
        if self.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {self.max_chunks}")
        k = getattr(self.routing, "k", 1)
        if k > self.num_experts:
            raise ValueError(f"routing takes k={k} experts per token but there are only {self.num_experts}")


class Router(nn.Module):
    """Linear router, weight [E, D]; for the sigmoid rule also the balancing bias [E] (a buffer,
    named as in transformers' DeepSeek-V3)."""

    def __init__(self, config: MoELayerConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.init_std)
        self.e_score_correction_bias: Tensor | None
        if isinstance(config.routing, SigmoidBias):
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: Tensor) -> Tensor:
        return nn.functional.linear(x_TD, self.weight)


class LocalExperts(nn.Module):
    """This rank's experts in transformers' fused layout: gate_up_proj [X, 2I, D], down_proj [X, D, I]."""

    def __init__(self, config: MoELayerConfig, num_local_experts: int) -> None:
        super().__init__()
        d, i = config.hidden_size, config.expert_hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_local_experts, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, d, i))
        nn.init.normal_(self.gate_up_proj, std=config.init_std)
        nn.init.normal_(self.down_proj, std=config.init_std)


class MoELayer(nn.Module):
    def __init__(self, config: MoELayerConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.comm = ExpertComm(group, config.num_experts)
        self.gate = Router(config)
        self.experts = LocalExperts(config, self.comm.num_local_experts)
        self.aux_loss: Tensor = torch.zeros(())
        self.register_buffer("load_E", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False)
        self.split_profile: SplitProfile | None = None
        self.timeline: Timeline | None = None  # set one to record the spans of the next steps
        self._num_chunks = config.num_chunks if self.comm.distributed else (config.num_chunks or 1)

    @property
    def num_chunks(self) -> int | None:
        """d in use; None until the first distributed training step has profiled it."""
        return self._num_chunks

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters that live on one rank only (never averaged across ranks)."""
        return [self.experts.gate_up_proj, self.experts.down_proj]

    def load_full_experts(self, gate_up_E2ID: Tensor, down_EDI: Tensor) -> None:
        """Copy this rank's slice of all E experts' weights (transformers' fused layout)."""
        first, local = self.comm.first_expert, self.comm.num_local_experts
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(gate_up_E2ID[first : first + local])
            self.experts.down_proj.copy_(down_EDI[first : first + local])

    def forward(self, hidden_states: Tensor) -> Tensor:
        x_TD = hidden_states.reshape(-1, self.config.hidden_size)
        num_tokens = x_TD.shape[0]
        routes = self.config.routing.route(self.gate(x_TD), self.gate.e_score_correction_bias)
        self.aux_loss = routes.aux_loss
        if self.training:
            self.load_E += routes.tokens_per_expert_E.to(self.load_E.device)
        plan = plan_dispatch(routes, num_tokens=num_tokens, num_chunks=self._chunks_for(routes), comm=self.comm)
        token_ids_P = routes.token_ids_P[plan.order_P]
        x_PD = x_TD[token_ids_P]
        exchange = ExchangeContext(
            plan=plan,
            comm=self.comm,
            expert_fn=select_expert_fn(self.config.expert_backend, x_TD.device),
            timeline=self.timeline,
        )
        y_PD = pipelined_exchange(x_PD, self.experts.gate_up_proj, self.experts.down_proj, exchange)
        out_TD = restore(y_PD, routes.weights_P[plan.order_P], token_ids_P, num_tokens)
        return out_TD.view(hidden_states.shape)

    def _chunks_for(self, routes: Routes) -> int:
        if self._num_chunks is not None:
            return self._num_chunks
        if not (self.training and torch.is_grad_enabled()):
            return 1  # d is profiled on a training step; evaluation before that runs unchunked
        self.split_profile = profile_split(
            comm=self.comm,
            expert_fn=select_expert_fn(self.config.expert_backend, self.experts.gate_up_proj.device),
            gate_up_X2ID=self.experts.gate_up_proj,
            down_XDI=self.experts.down_proj,
            num_rows=int(routes.token_ids_P.numel()),
            max_chunks=self.config.max_chunks,
        )
        self._num_chunks = self.split_profile.num_chunks
        return self._num_chunks

    @torch.no_grad()
    def update_bias(self) -> None:
        """End of a step: for the sigmoid rule, move the balancing bias using the load summed over
        the group since the last call; for every rule, reset the load counter."""
        if isinstance(self.config.routing, SigmoidBias):
            load_E = self.comm.all_reduce_sum(self.load_E.clone())
            self.config.routing.update_bias(self.gate.e_score_correction_bias, load_E)
        self.load_E.zero_()
