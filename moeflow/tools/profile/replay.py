"""Replay: a routing trace through the real cache, per policy and budget, without the model.

A trace (`moeflow.tools.trace`) is recorded once; each (policy, budget) is then a replay that drives the
engine's own `ExpertCache` and policy classes, with no model and no weights: the slot pool lives on
the meta device and the backing store copies nothing (`NullStore`). One decode step is one token:
for every MoE layer in order, its top-k experts go through `serve_layer`, the per-layer cache
protocol the live forward runs, so a replay counts the hits and misses a live run
with the same tokens, policy and budget counts (`moeflow.tools.profile.live` measures that run; a test compares).

`predictive` replays the prefetcher (`moeflow.offload.prefetch.PredictivePrefetcher`) with the
predictions recorded in the trace (`pred_<name>.npy`) and a `TransferEngine` without a thread; `belady`
(`moeflow.offload.policy.BeladyPolicy`) is the offline optimum for demand eviction without prefetch.
Spans of the trace can be replayed as prefills instead (`prefill`): one step for all their tokens, as the
engine prefills a prompt, left out of what the replay reports.

Shapes: see the legend in `moeflow/__init__.py` (here N trace tokens, M predicted ranks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.admission import AdmissionConfig
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import serve_layer
from moeflow.offload.plans import RoutingPlan
from moeflow.offload.policy import AutoPolicy, BeladyPolicy, EvictionPolicy, PredictivePolicy, make_policy
from moeflow.offload.prefetch import PredictivePrefetcher
from moeflow.offload.reuse import LearnedReuse, ReuseModel
from moeflow.offload.stats import CacheStats
from moeflow.offload.transfer import TransferEngine
from moeflow.predictor.predictors import PREDICTORS
from moeflow.tools.profile.report import LayerRecord, Mode, RunRecord
from moeflow.tools.profile.setting import BudgetPoint, Geometry
from moeflow.tools.trace import Trace


class NullStore:
    """A backing tier that moves nothing: each read only reports the expert's size on disk."""

    direct_io = False

    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes

    def read_into(self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor) -> int:
        return self.expert_bytes

    def close(self) -> None:
        pass


def replay_cache(geometry: Geometry, slots: int, policy: EvictionPolicy) -> ExpertCache:
    """The engine's cache over a meta-device pool (no memory) and a `NullStore`."""
    pool = SlotPool(capacity=slots, inter=geometry.inter, hidden=geometry.hidden, dtype=torch.float32,
                    device=torch.device("meta"))
    return ExpertCache(pool=pool, store=NullStore(geometry.expert_bytes), policy=policy, layers=geometry.layers,
                       budget_bytes=slots * geometry.slot_bytes)


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One (policy, budget) run over a trace's tokens, replayed or measured live, with the cache's own statistics."""

    policy: str
    predictor: str | None
    mode: Mode
    budget: BudgetPoint
    tokens: int
    stats: CacheStats
    prefetch: dict[str, float] | None  # the prefetcher's counters (predictive only)
    seconds: float  # wall time of the run

    def record(self, expert_bytes: int, links: dict[str, float], *,
               routing_agreement: float | None = None) -> RunRecord:
        """The run as the report holds it: rates per token and the predicted stall on every link."""
        s = self.stats
        per_token = max(self.tokens, 1)
        demand_bytes = s.misses * expert_bytes / per_token
        live = self.mode == "live"
        return RunRecord(
            policy=self.policy,
            predictor=self.predictor,
            mode=self.mode,
            budget=self.budget.fraction,
            budget_spec=self.budget.spec,
            slots=self.budget.slots,
            tokens=self.tokens,
            hit_rate=s.hit_rate,
            hits=s.hits,
            misses=s.misses,
            prefetch_hits=s.prefetch_hits,
            wasted_prefetches=s.wasted_prefetches,
            bytes_per_token=s.bytes_read / per_token,
            demand_bytes_per_token=demand_bytes,
            # Demand misses stall compute; prefetch reads are assumed hidden behind it...
            stall_s_per_token={name: demand_bytes / bw for name, bw in links.items()},
            # ...and if nothing overlaps, every byte read stalls (the upper bound).
            transfer_s_per_token={name: s.bytes_read / per_token / bw for name, bw in links.items()},
            per_layer=tuple(
                LayerRecord(
                    layer=ls.layer,
                    hit_rate=ls.hits / (ls.hits + ls.misses) if ls.hits + ls.misses else 0.0,
                    hits=ls.hits,
                    misses=ls.misses,
                    prefetch_hits=ls.prefetch_hits,
                    wasted_prefetches=ls.wasted_prefetches,
                    bytes_read=ls.bytes_read,
                )
                for ls in s.per_layer
            ),
            prefetch=self.prefetch,
            measured_stall_s_per_token=s.stall_s / per_token if live else None,
            measured_read_gib_s=s.read_gib_s if live else None,
            tokens_per_s=(self.tokens / self.seconds if self.seconds > 0 else 0.0) if live else None,
            routing_agreement=routing_agreement,
        )


def replay(
    trace: Trace,
    geometry: Geometry,
    *,
    policy: str,
    budget: BudgetPoint,
    predictor: str | None = None,
    width: int = 0,
    overlap: float = 1.0,
    contention: float | None = None,
    reuse: ReuseModel | None = None,
    prefill: Sequence[tuple[int, int]] = (),
    read_ahead: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> RunResult:
    """Drive the real cache and `policy` with `trace`'s routing, one token per decode step.

    `prefill`: spans [start, end) of the trace's tokens each replayed as one step of all its tokens, as the engine
    prefills a prompt (every layer once, for the union of the tokens' experts, the predictions of all of them
    offered): they leave the cache as a prompt leaves it, and the cache's statistics in the result are the other
    tokens' (the prefetcher's counters count them all).

    `overlap`: how many expert reads the compute of the lookahead's layers hides, which the live engine
    measures and replay cannot (`moeflow.offload.admission`; 0: the link is the bottleneck); `contention`: the
    share of a read ahead's cost that overlap never hides (None: `AdmissionConfig`'s floor; the live engine raises it
    to the share of the time it measures the link busy, `PredictivePrefetcher.contention`). `reuse`: the
    predictive policy evicts by this trained model (`moeflow.offload.reuse`), and the auto policy has it among
    its candidates, as the engine does when its predictor folder holds one. `read_ahead`: as the engine's, for a
    whole-step predictor (`PredictivePrefetcher`; 0 chooses the window from `overlap`, as the engine from what it
    measures; None, profiling's: the lookahead).
    """
    geometry.check_trace(trace)
    experts_NLK = np.asarray(trace.experts)
    layers = list(geometry.layers)
    if prefill and policy == "belady":
        raise MoeflowError("belady replays one token a step (its future is the trace's token order); no prefill spans")
    if policy == "belady":
        eviction: EvictionPolicy = BeladyPolicy(experts_NLK, layers)
    else:
        eviction = make_policy(policy)
    if reuse is not None and isinstance(eviction, (PredictivePolicy, AutoPolicy)):
        eviction.estimate_with(LearnedReuse(reuse))
    cache = replay_cache(geometry, budget.slots, eviction)
    prefetcher, pred_NLM, prob_NLM, whole_step = None, None, None, False
    if policy == "predictive":
        pred_NLM, lookahead = predictions_of(trace, predictor)
        prob_NLM = trace.probabilities.get(predictor)
        whole_step = predictor in PREDICTORS and PREDICTORS[predictor].whole_step
        width = width or geometry.top_k
        if width > pred_NLM.shape[-1]:
            raise MoeflowError(
                f"--prefetch-width {width} is more than the {pred_NLM.shape[-1]} ranks the trace recorded for "
                f"{predictor!r}; lower it or record the trace again"
            )
        transfer = TransferEngine(cache, background=False)
        measured = {} if contention is None else {"contention": contention}
        prefetcher = PredictivePrefetcher(cache, transfer.prefetch, layers=layers, lookahead=lookahead, width=width,
                                          admission=AdmissionConfig(overlap=overlap, **measured),
                                          read_ahead=read_ahead if whole_step else None)

    def step(a: int, b: int, *, decode: bool) -> None:
        """Tokens [a, b) as one step: a decode step (one token) or a prefill."""
        if prefetcher is not None:
            # Every prediction in the trace was made before its layer's lookahead window opened, so
            # offering them all when the step begins issues each at the time the engine issues it: in one
            # call for a predictor whose one answer covers the step (as the engine offers it), else layer by layer.
            prefetcher.begin_step(decode_rows=1 if decode else 0)
            probs_LTM = None if prob_NLM is None else prob_NLM[a:b, :, :width].transpose(1, 0, 2).tolist()
            ranked_LTM = pred_NLM[a:b, :, :width].transpose(1, 0, 2).tolist()
            if whole_step:
                prefetcher.offer_layers(layers, ranked_LTM, probs_LTM)
            else:
                for pos, layer in enumerate(layers):
                    prefetcher.offer(layer, ranked_LTM[pos], None if probs_LTM is None else probs_LTM[pos])
        for pos, layer in enumerate(layers):
            expert_ids = tuple(sorted(set(experts_NLK[a:b, pos].reshape(-1).tolist())))  # the engine's torch.unique
            if prefetcher is not None:
                prefetcher.on_routing(layer, expert_ids)
            serve_layer(cache, RoutingPlan(layer=layer, expert_ids=expert_ids, num_tokens=b - a))

    t0 = time.perf_counter()
    starts = dict(prefill)
    uncounted: list[tuple[CacheStats, CacheStats]] = []  # the cache's statistics around each prefill
    n = counted = 0
    while n < trace.num_tokens:
        if n in starts:
            before = cache.stats()
            step(n, starts[n], decode=False)
            uncounted.append((before, cache.stats()))
            n = starts[n]
            continue
        if on_tokens is not None and counted % 1024 == 1023:
            on_tokens(1024)
        step(n, n + 1, decode=True)
        n, counted = n + 1, counted + 1
    if prefetcher is not None:
        prefetcher.end_step()
    if on_tokens is not None:
        on_tokens(counted % 1024)
    return RunResult(
        policy=policy,
        predictor=predictor if policy == "predictive" else None,
        mode="replay",
        budget=budget,
        tokens=counted,
        stats=_less(cache.stats(), uncounted),
        prefetch=prefetcher.counters.to_dict() if prefetcher is not None else None,
        seconds=time.perf_counter() - t0,
    )


_COUNTS = ("hits", "misses", "prefetch_hits", "wasted_prefetches", "bytes_read", "stall_s")


def _less(stats: CacheStats, spans: Sequence[tuple[CacheStats, CacheStats]]) -> CacheStats:
    """`stats` without what the cache counted between each (before, after) of `spans`."""
    if not spans:
        return stats

    def less(now: object, parts: Sequence[tuple[object, object]]) -> dict:
        return {c: getattr(now, c) - sum(getattr(b, c) - getattr(a, c) for a, b in parts) for c in _COUNTS}

    per_layer = tuple(replace(ls, **less(ls, [(a.per_layer[i], b.per_layer[i]) for a, b in spans]))
                      for i, ls in enumerate(stats.per_layer))  # fmt: skip
    return replace(stats, per_layer=per_layer, **less(stats, spans))


def predictions_of(trace: Trace, predictor: str | None) -> tuple[np.ndarray, int]:
    """The recorded predictions [N, L, M] of `predictor` and the lookahead they were made at."""
    recorded = trace.meta.get("predictions", {})
    if predictor is None or predictor not in trace.predictions:
        have = ", ".join(recorded) or "none"
        raise MoeflowError(
            f"policy 'predictive' replays recorded predictions, but the trace has none of predictor {predictor!r} "
            f"(it has: {have}); record the trace with `moeflow trace --predictors {predictor or 'gate'}` "
            f"or let `moeflow profile` record it (omit --trace)"
        )
    return np.asarray(trace.predictions[predictor]), int(recorded[predictor]["lookahead"])
