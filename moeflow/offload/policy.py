"""Eviction policies for the expert cache: pure Python, testable without a model.

A policy sees inserts, uses and evictions of resident experts and picks a victim among the
candidates the cache offers (resident, fully loaded, not pinned by a running layer).
`predictive` protects what the routing predictor expects next; profiling replay adds `belady`.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.admission import ReuseRates


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def on_insert(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def on_access(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def on_evict(self, key: ExpertKey) -> None: ...

    @abstractmethod
    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        """Choose which of `candidates` (non-empty) to evict."""


class LRUPolicy(EvictionPolicy):
    """Evict the expert whose last use is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # oldest use first

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None

    def on_access(self, key: ExpertKey) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: ExpertKey) -> None:
        del self._order[key]

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        allowed = set(candidates)
        return next(k for k in self._order if k in allowed)


class LFUPolicy(EvictionPolicy):
    """Evict the expert used least often over the whole run (counts survive eviction); ties go to LRU."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._tick = 0

    def on_insert(self, key: ExpertKey) -> None:
        self._last[key] = self._tick

    def on_access(self, key: ExpertKey) -> None:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._tick

    def on_evict(self, key: ExpertKey) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0)))


class PredictivePolicy(LRUPolicy):
    """Evicts the expert least likely to be used again; predicted experts are evicted only when nothing else can be.

    The prefetcher (`moeflow.offload.prefetch.PredictivePrefetcher`) protects the experts it reads ahead
    and, once a layer's real routing is known, releases them and demotes the wrong ones (the next
    victims). It also tells the policy what it expects of the rest of the step (`expect`: the
    calibrated probability that a resident expert is used by an upcoming layer). Every other expert
    is worth its reuse rate (`ReuseRates`, learned from the gaps between uses); the victim is the
    unprotected candidate worth least, the least recently used among equals.
    """

    name = "predictive"

    def __init__(self) -> None:
        super().__init__()
        self._protected: set[ExpertKey] = set()
        self._demoted: set[ExpertKey] = set()
        self._expected: dict[ExpertKey, float] = {}
        self.reuse = ReuseRates()

    # ---- what the prefetcher tells the policy ---------------------------------------------------------

    def begin_step(self) -> None:
        self.reuse.step += 1
        self._expected.clear()

    def protect(self, keys: Iterable[ExpertKey]) -> None:
        self._protected.update(keys)

    def release(self, keys: Iterable[ExpertKey]) -> None:
        self._protected.difference_update(keys)

    def demote(self, keys: Iterable[ExpertKey]) -> None:
        """Make resident `keys` the next victims (a wrong prediction is worth least)."""
        for key in keys:
            if key in self._order:
                self._order.move_to_end(key, last=False)
                self._demoted.add(key)

    def expect(self, probabilities: dict[ExpertKey, float]) -> None:
        """Experts an upcoming layer of this step will use with these probabilities (until `forget`)."""
        self._expected.update(probabilities)

    def forget(self, keys: Iterable[ExpertKey]) -> None:
        for key in keys:
            self._expected.pop(key, None)

    # ---- what the policy knows --------------------------------------------------------------------------

    @property
    def protected(self) -> frozenset[ExpertKey]:
        return frozenset(self._protected)

    def worth(self, key: ExpertKey) -> float:
        """P(`key` is used at its next step): 0 if demoted, else its reuse rate raised to what is expected of it."""
        if key in self._demoted:
            return 0.0
        return max(self._expected.get(key, 0.0), self.reuse.reuse(key))

    def eviction_worths(self, n: int) -> list[float]:
        """The worth of the next `n` victims among the resident unprotected experts, in eviction order."""
        return heapq.nsmallest(n, (self.worth(k) for k in self._order if k not in self._protected))

    def resident(self, key: ExpertKey) -> bool:
        return key in self._order

    # ---- the policy protocol ----------------------------------------------------------------------------

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self._demoted.discard(key)
        self.reuse.on_use(key)

    def on_evict(self, key: ExpertKey) -> None:
        super().on_evict(key)
        self._protected.discard(key)
        self._demoted.discard(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        allowed = set(candidates)
        unprotected = allowed - self._protected
        pick_from = unprotected or allowed
        best, best_worth = None, math.inf
        for k in self._order:  # least recently used first: ties go to it
            if k in pick_from and (w := self.worth(k)) < best_worth:
                best, best_worth = k, w
                if w == 0.0:
                    break
        assert best is not None, "a victim among the candidates"
        return best


class BeladyPolicy(EvictionPolicy):
    """Evict the expert whose next use is farthest in the future (never used again: farthest of all).

    The offline optimum for demand eviction without prefetch, so it needs the whole future access
    sequence and exists only in profiling replay. Built from a routing trace: at time
    `t = n * L + l`, token n needs the experts `experts_NLK[n, l]` of MoE layer `layers[l]`. The
    cache must then demand exactly that stream: each `on_access(key)` consumes the key's next use.
    """

    name = "belady"

    def __init__(self, experts_NLK: np.ndarray, layers: Sequence[int]) -> None:
        N, L, K = experts_NLK.shape
        assert L == len(layers), "one column of experts per MoE layer"
        ids = np.asarray(experts_NLK, dtype=np.int64).reshape(-1)
        times = np.repeat(np.arange(N * L, dtype=np.int64), K)
        layer_of = np.asarray(layers, dtype=np.int64)[(times % L)]
        order = np.lexsort((times, ids, layer_of))  # by key, then by time
        key_layer, key_expert, key_time = layer_of[order], ids[order], times[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(key_layer) != 0) | (np.diff(key_expert) != 0)])
        ends = np.r_[starts[1:], len(order)]
        self._uses: dict[ExpertKey, np.ndarray] = {
            (int(key_layer[a]), int(key_expert[a])): key_time[a:b] for a, b in zip(starts, ends)
        }
        self._next: dict[ExpertKey, int] = dict.fromkeys(self._uses, 0)  # index of the next unconsumed use
        self._never = N * L  # later than any use

    def next_use(self, key: ExpertKey) -> int:
        uses = self._uses.get(key)
        i = self._next.get(key, 0)
        return int(uses[i]) if uses is not None and i < len(uses) else self._never

    def on_insert(self, key: ExpertKey) -> None:
        pass

    def on_access(self, key: ExpertKey) -> None:
        assert self._next.get(key, 0) < len(self._uses.get(key, ())), f"{key} accessed more often than the trace says"
        self._next[key] += 1

    def on_evict(self, key: ExpertKey) -> None:
        pass

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        return max(candidates, key=lambda k: (self.next_use(k), k))


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy, "predictive": PredictivePolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A live eviction policy by name (`moeflow.config.LivePolicy`; belady needs a trace: `BeladyPolicy`)."""
    return POLICIES[name]()
