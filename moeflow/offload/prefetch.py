"""Predictive prefetch with correction: bring predicted experts in ahead of their layer, fix mistakes.

One decode step walks the MoE layers in order (positions 0..L-1 of `layers`). Predictions for a
layer are *offered* whenever a predictor has them (a context predictor offers every layer before
the forward; gate lookahead offers layer i+d while layer i runs). The prefetcher issues a layer's
prediction once the step has reached `lookahead` layers before it, protects those experts from
eviction (`PredictivePolicy`), and when the layer's real routing is known (`on_routing`, just
before the layer acquires its experts) it corrects itself: the predictions of that layer are
released, the wrong ones whose reads are still queued dropped and the rest demoted to the front of
the eviction order; the missed experts are then read on demand by the cache (which also takes over
a right prediction whose read is still queued rather than wait behind the others). The cache
decides hits and misses, so correctness never depends on a prediction: a wrong one costs a wasted
read, never a wrong output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.cache import ExpertCache
from moeflow.offload.plans import PrefetchPlan
from moeflow.offload.policy import PredictivePolicy


@dataclass
class PrefetchCounters:
    steps: int = 0
    offered: int = 0  # distinct experts predicted (after the width cap)
    issued: int = 0  # prefetch reads queued (predicted and not resident)
    cancelled: int = 0  # queued reads dropped before they started: their layer ran without them
    correct: int = 0  # predicted experts the layer then used
    used: int = 0  # experts the layers used

    @property
    def precision(self) -> float:
        return self.correct / self.offered if self.offered else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**vars(self), "precision": self.precision, "recall": self.recall}


class PredictivePrefetcher:
    """Turns per-layer predictions into `PrefetchPlan`s `lookahead` layers ahead, with correction.

    `issue` starts the reads (the engine's `TransferEngine.prefetch`; profiling replay passes a
    synchronous one). `width` caps how many experts per token are prefetched for one layer.
    """

    def __init__(
        self,
        cache: ExpertCache,
        issue: Callable[[PrefetchPlan], int],
        *,
        layers: Sequence[int],
        lookahead: int = DEFAULT_LOOKAHEAD,
        width: int = 2,
    ) -> None:
        if not isinstance(cache.policy, PredictivePolicy):
            raise MoeflowError("predictive prefetch needs the cache policy 'predictive'")
        if lookahead < 1:
            raise MoeflowError(f"lookahead must be at least 1 layer, got {lookahead}")
        if width < 1:
            raise MoeflowError(f"prefetch width must be at least 1 expert per token, got {width}")
        self.cache = cache
        self.issue = issue
        self.layers = list(layers)
        self._pos_of = {layer: i for i, layer in enumerate(self.layers)}
        self.lookahead = lookahead
        self.width = width
        # Slots one layer's predictions may take: the window holds lookahead + 1 layers.
        self._per_layer_cap = max(1, cache.pool.capacity // (lookahead + 1))
        self.counters = PrefetchCounters()
        self._reset()

    def _reset(self) -> None:
        self._pos = -1  # position of the layer that runs now; -1 before the first
        self._pending: dict[int, list[int]] = {}  # layer -> predicted experts not yet issued
        self._predicted: dict[int, set[int]] = {}  # layer -> predicted experts issued (awaiting correction)
        self._current: list[ExpertKey] = []  # the running layer's experts, kept until the next layer

    # ---- the step -------------------------------------------------------------------------------

    def begin_step(self) -> None:
        self.end_step()
        self.counters.steps += 1

    def offer(self, layer: int, ranked_TM: Sequence[Sequence[int]]) -> None:
        """Predicted experts of `layer` for this step: one ranked list per token, best first."""
        if layer not in self._pos_of or layer in self._pending or layer in self._predicted:
            return
        experts: list[int] = []
        seen: set[int] = set()
        for rank in range(self.width):  # rank-major: every token's best guess before anyone's second
            for ranked in ranked_TM:
                if rank < len(ranked) and (e := int(ranked[rank])) not in seen:
                    seen.add(e)
                    experts.append(e)
        self._pending[layer] = experts[: self._per_layer_cap]
        self._issue_due()

    def on_routing(self, layer: int, expert_ids: Iterable[int]) -> None:
        """`layer`'s real experts are known: correct its predictions, move the window on."""
        used = set(expert_ids)
        self.cache.release(self._current)
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:  # issued: release; wrong ones not yet read are dropped, the rest go first
            wrong = [(layer, e) for e in predicted - used]
            self.cache.release((layer, e) for e in predicted)
            self.counters.cancelled += self.cache.cancel_queued(wrong)
            self.cache.demote(wrong)
        else:  # offered too late to issue; still counts for accuracy
            predicted = set(self._pending.pop(layer, ()))
        self.counters.offered += len(predicted)
        self.counters.correct += len(predicted & used)
        self.counters.used += len(used)
        self._current = [(layer, e) for e in used]
        self.cache.protect(self._current)  # the next layer's prefetch must not evict these
        self._pos = self._pos_of.get(layer, self._pos)
        self._issue_due()

    def end_step(self) -> None:
        """Release everything this step protected; predictions never used are dropped."""
        self.cache.release(self._current)
        for layer, predicted in self._predicted.items():
            keys = [(layer, e) for e in predicted]
            self.cache.release(keys)
            self.counters.cancelled += self.cache.cancel_queued(keys)
        self._reset()

    # ---- issuing --------------------------------------------------------------------------------

    def _issue_due(self) -> None:
        due = [layer for layer in self._pending if self._pos_of[layer] <= self._pos + self.lookahead]
        for layer in sorted(due, key=self._pos_of.__getitem__):  # most urgent first
            experts = self._pending.pop(layer)
            if self._pos_of[layer] <= self._pos:  # its layer has run already: too late to matter
                continue
            keys = [(layer, e) for e in experts]
            self.cache.protect(keys)
            self._predicted[layer] = set(experts)
            self.counters.issued += self.issue(PrefetchPlan(keys=tuple(keys)))
