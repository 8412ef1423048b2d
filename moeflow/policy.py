"""Eviction policies for the expert cache: pure Python, testable without a model.

A policy sees inserts, uses and evictions of resident experts and picks a victim among the
candidates the cache offers (resident, fully loaded, not pinned by a running layer).
`predictive` protects what the routing predictor expects next; profiling replay adds `belady`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from .errors import MoeflowError
from .plans import ExpertKey


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
    """LRU that keeps predicted experts: a protected expert is evicted only when nothing else can be.

    The prefetcher (`moeflow.prefetch.PredictivePrefetcher`) protects what it predicts for the next
    layers and, once a layer's real routing is known, releases its predictions and demotes the wrong
    ones to the front of the eviction order.
    """

    name = "predictive"

    def __init__(self) -> None:
        super().__init__()
        self._protected: set[ExpertKey] = set()

    def protect(self, keys: Iterable[ExpertKey]) -> None:
        self._protected.update(keys)

    def release(self, keys: Iterable[ExpertKey]) -> None:
        self._protected.difference_update(keys)

    def demote(self, keys: Iterable[ExpertKey]) -> None:
        """Make resident `keys` the next victims (a wrong prediction is worth least)."""
        for key in keys:
            if key in self._order:
                self._order.move_to_end(key, last=False)

    @property
    def protected(self) -> frozenset[ExpertKey]:
        return frozenset(self._protected)

    def on_evict(self, key: ExpertKey) -> None:
        super().on_evict(key)
        self._protected.discard(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        allowed = set(candidates)
        unprotected = allowed - self._protected
        pick_from = unprotected or allowed
        return next(k for k in self._order if k in pick_from)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy, "predictive": PredictivePolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise MoeflowError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}") from None
