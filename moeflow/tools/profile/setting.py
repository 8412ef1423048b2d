"""The setting of a profile: the model's geometry, the budgets and the policies the user asked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeflow.errors import BudgetError, MoeflowError
from moeflow.model.checkpoint import Checkpoint
from moeflow.offload.budget import resolve_budget
from moeflow.offload.policy import POLICIES
from moeflow.tools.trace import Trace

REPLAY_POLICIES = (*POLICIES, "belady")


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """What replay needs to know about the model: its MoE layers and the size of one expert."""

    layers: tuple[int, ...]
    num_experts: int  # per MoE layer
    top_k: int
    inter: int
    hidden: int
    expert_bytes: int  # one expert on disk: what a miss or a prefetch reads

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def slot_bytes(self) -> int:
        """One slot of the CPU engine's pool (float32), so byte budgets mean what `moeflow generate` makes of them."""
        return 3 * self.inter * self.hidden * 4

    @classmethod
    def of(cls, checkpoint: Checkpoint, top_k: int) -> Geometry:
        layers = tuple(checkpoint.moe_layers)
        loc = checkpoint.experts[(layers[0], 0)]
        inter, hidden = loc.inter, loc.hidden
        return cls(
            layers=layers,
            num_experts=int(checkpoint.num_experts[layers[0]]),
            top_k=top_k,
            inter=int(inter),
            hidden=int(hidden),
            expert_bytes=sum(s.nbytes for s in loc.spans),
        )

    def check_trace(self, trace: Trace) -> None:
        if tuple(trace.layers) != self.layers or trace.num_experts != self.num_experts or trace.top_k != self.top_k:
            raise MoeflowError(
                f"the trace was recorded on another model (layers {trace.layers}, {trace.num_experts} experts, "
                f"top-{trace.top_k}; the model has layers {list(self.layers)}, {self.num_experts} experts, "
                f"top-{self.top_k}); pass the matching --model or record the trace again"
            )


@dataclass(frozen=True, kw_only=True)
class BudgetPoint:
    spec: str  # as the user wrote it: "25%", "512MiB"
    fraction: float  # of all experts' bytes
    slots: int


def split_names(text: str) -> list[str]:
    """`"lru, lfu,"` -> `["lru", "lfu"]`: a comma-separated option's items."""
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_budgets(text: str, geometry: Geometry) -> list[BudgetPoint]:
    """`--budgets 12.5%,25%,50%` into slot counts, refusing any budget the engine would refuse."""
    specs = split_names(text)
    if not specs:
        raise MoeflowError(f"--budgets {text!r} names no budget; write e.g. --budgets 12.5%,25%,50%")
    total = geometry.slot_bytes * geometry.total_experts
    points = []
    for spec in specs:
        try:
            b = resolve_budget(spec, slot_bytes=geometry.slot_bytes, total_experts=geometry.total_experts,
                               top_k=geometry.top_k)
        except BudgetError as e:
            raise MoeflowError(f"--budgets: {str(e).replace('--expert-budget', 'it')}") from None
        points.append(BudgetPoint(spec=spec, fraction=min(b.budget_bytes / total, 1.0), slots=b.slots))
    return points


def parse_policies(text: str) -> list[str]:
    names = split_names(text)
    if not names:
        raise MoeflowError(f"--policies {text!r} names no policy; choose from: {', '.join(REPLAY_POLICIES)}")
    unknown = [n for n in names if n not in REPLAY_POLICIES]
    if unknown:
        raise MoeflowError(
            f"unknown cache policy {unknown[0]!r} in --policies; choose from: {', '.join(REPLAY_POLICIES)}"
        )
    return list(dict.fromkeys(names))


def policy_runs(policies: Sequence[str], predictors: Sequence[str]) -> list[tuple[str, str | None]]:
    """(policy, predictor) per run: `predictive` once per predictor, every other policy once, without one."""
    runs: list[tuple[str, str | None]] = []
    for policy in policies:
        if policy == "predictive":
            if not predictors:
                raise MoeflowError("policy 'predictive' needs a predictor; pass --predictor NAME (e.g. gate)")
            runs.extend((policy, p) for p in predictors)
        else:
            runs.append((policy, None))
    return runs
