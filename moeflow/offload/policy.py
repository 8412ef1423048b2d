"""Eviction policies for the expert cache: pure Python, testable without a model.

A policy sees inserts, uses and evictions of resident experts and picks a victim among the
candidates the cache offers (resident, fully loaded, not pinned by a running layer).
`predictive` protects what the routing predictor expects next; profiling replay adds `belady`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.admission import NextUse


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

    def on_layer(self, layer: int) -> None:  # noqa: B027 - optional: most policies keep no clock
        """MoE layer `layer` runs (once per forward step, before its experts' `on_access`): a policy's clock."""


class KeepAllPolicy(EvictionPolicy):
    """For a cache with a slot for every expert, which never evicts: no books to keep. The engine uses it in place
    of any policy but the predictive one (whose prefetcher reads its state) when the budget holds every expert:
    there the default auto policy's bookkeeping (its duels' shadows, LRFU weights, the reuse model's inputs) cost
    ~8% of a decode step of the shipped model (two trees alternating, 4 processes each) and could never be used."""

    name = "keep-all"

    def on_insert(self, key: ExpertKey) -> None:
        pass

    def on_access(self, key: ExpertKey) -> None:
        pass

    def on_evict(self, key: ExpertKey) -> None:
        pass

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        raise AssertionError("a cache with a slot for every expert never needs a victim")


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


class LRFUPolicy(EvictionPolicy):
    """Evict the expert with the least recent use *weight*: every use adds 1, which halves every `half_life` runs of
    the expert's own layer (LRFU, Lee et al. 2001, between LFU and LRU); weights survive eviction.

    Why not LRU: a batch decode step needs more distinct experts than the budget holds (8 rows route to ~25 of
    the shipped model's 64 experts a step, 16 slots at 25%), so LRU evicts each expert just before its layer
    needs it again and hits almost nothing (`bench/expertflow.py`'s batch runs: 0-2%), while the experts many
    rows share are used step after step and are worth keeping. Counted in runs of the expert's own layer, so a
    half-life means the same for a model of 4 layers as of 32, whatever the batch size. On the I/O-bound model at
    25%, 128 prompts (`bench/expertflow.py --part rebatch --prompts 128 --repeats 1`, kept as
    bench/results/expertflow_rebatch_lrfu.json): 11-17% fewer bytes per token than LRU at batch 8 and 0-7% at 32,
    1.12x LRU's tokens/s at batch 8. At batch 1 it reads about LRU's bytes on the shipped model's routing and
    1.3x them on the random-routing model at 25% (`moeflow profile`): hence `AutoPolicy`.

    The clock: `on_layer`, which the cache calls as a layer runs. A weight is kept as its logarithm plus the
    decay of its layer's clock at the last use, so an update is one log-add and a comparison needs no power.
    """

    name = "lrfu"

    def __init__(self, half_life: float = 8.0) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 (runs of a layer), got {half_life}")
        self._rate = math.log(2.0) / half_life
        self._clock: dict[int, int] = {}  # MoE layer -> its runs so far
        self._weight: dict[ExpertKey, float] = {}  # log(weight at the last use) + rate x that use's clock

    def on_layer(self, layer: int) -> None:
        self._clock[layer] = self._clock.get(layer, 0) + 1

    def on_insert(self, key: ExpertKey) -> None:
        pass

    def on_access(self, key: ExpertKey) -> None:
        now = self._rate * self._clock.get(key[0], 0)  # log of one use, in the same units
        old = self._weight.get(key)
        if old is None:
            self._weight[key] = now
        else:  # log(exp(old) + exp(now)), without overflow however long ago the last use was
            hi, lo = (old, now) if old > now else (now, old)
            self._weight[key] = hi + math.log1p(math.exp(lo - hi))

    def on_evict(self, key: ExpertKey) -> None:
        pass

    def weight(self, key: ExpertKey) -> float:
        """The key's use weight now (0.0 if never used)."""
        w = self._weight.get(key)
        return 0.0 if w is None else math.exp(w - self._rate * self._clock.get(key[0], 0))

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        weight, clock, rate = self._weight, self._clock, self._rate
        # Never used (inserted ahead of its use) ranks lowest; ties go to the first candidate.
        return min(candidates, key=lambda k: weight.get(k, -math.inf) - rate * clock.get(k[0], 0))


class ReuseEstimate(Protocol):
    """What `PredictivePolicy` and `AutoPolicy` ask of an estimate of reuse: `NextUse` (learned online) or
    `moeflow.offload.reuse.LearnedReuse` (a trained model)."""

    def begin_step(self, step: int) -> None: ...

    def on_use(self, key: ExpertKey, step: int) -> None: ...

    def probabilities(self, keys: Sequence[ExpertKey]) -> list[float]: ...


def least_likely(estimate: ReuseEstimate, candidates: Sequence[ExpertKey]) -> ExpertKey:
    """The candidate `estimate` finds least likely to be used; the first among equals (candidates come least
    recently used first, so ties go to LRU)."""
    probs = estimate.probabilities(candidates)
    return candidates[probs.index(min(probs))]


class _Shadow:
    """A cache of `capacity` keys that only counts its own misses on the real access stream (no data).

    `victim(candidates)` chooses what it evicts; the keys one layer of one step uses are never victims of
    each other (they are pinned together in the real cache). Misses fade with `decay` per step, so the
    count is about the recent stream. It starts empty, or holding `start` (least recently used first)."""

    def __init__(self, capacity: int, victim: Callable[[Sequence[ExpertKey]], ExpertKey], decay: float,
                 start: Iterable[ExpertKey] = ()) -> None:  # fmt: skip
        self.capacity = capacity
        self._victim = victim
        self._decay = decay
        self._order: OrderedDict[ExpertKey, None] = OrderedDict.fromkeys(start)
        self.misses = 0.0

    def access(self, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        if key in self._order:
            self._order.move_to_end(key)
            return
        self.misses += 1.0
        if len(self._order) >= self.capacity:
            candidates = [k for k in self._order if k not in pinned]
            if candidates:
                del self._order[self._victim(candidates)]
        self._order[key] = None

    def end_step(self) -> None:
        self.misses *= self._decay


_DUEL_FADE = 0.5**0.5  # a duel's misses count half as much two duels later


class AutoPolicy(LRUPolicy):
    """LRU, LRFU or a trained reuse model, whichever has missed least in the duels lately: the engine's default.

    None is better everywhere. Replayed at batch 1 on the shipped model's held-out routing LRFU reads about
    LRU's bytes (fewer at 25-50%, a little more at 12.5%), on the random-routing model at 25% 1.3x LRU's; in batch
    decoding, where a step needs more experts than the budget holds, LRU hits almost nothing and LRFU reads
    11-17% fewer bytes (`bench/expertflow.py --part rebatch`). With `estimate_with` (the trained reuse model of the
    model's predictor folder, `moeflow.offload.reuse`, which `moeflow.load` gives it when there is one) a third
    candidate evicts the expert least likely to be used within its layer's next few runs: replayed on the shipped
    model's held-out routing at 25% it misses 15% less than LRU, with no predictor call and no read ahead; it was
    trained on one token a step, and batches feed it unions it never saw.

    A duel decides: for `window` steps out of every `period` (a step: the layers' runs from the first layer
    again), from the first eviction on, one shadow cache per candidate, each starting from what the real cache
    holds, replays the access stream (no data) and counts its misses; from the window's end to the next one's,
    evictions follow the one with the fewest misses over the duels so far, each duel's counting half as much two
    duels later (on a tie: the trained model, then LRFU). Where few experts miss, the last window alone is a
    handful of misses: decided by it, auto read 1.14x LRU's bytes on the random-routing model at 25%, with the
    history 1.04x (`moeflow profile`). The policy's bookkeeping on the shipped model's routing at 25% (`python
    bench/predictor_cost.py --baseline de47f6d --rounds 1 --batches 1`, kept as bench/results/predictor_cost_auto.json):
    66 us a token, 160 with the reuse model, LRU 21; before the duels, with two shadows on every step, 126 against
    LRU's 33 in the same run.
    """

    name = "auto"

    def __init__(self, *, half_life: float = 8.0, window: int = 32, period: int = 128) -> None:
        if not 0 < window <= period:
            raise ValueError(f"a duel's window ({window} steps) must be positive and within its period ({period})")
        super().__init__()
        self.lrfu = LRFUPolicy(half_life)
        self.estimate: ReuseEstimate | None = None
        self.step = 0  # forward steps begun (a layer at or before the last one ran)
        self.window, self.period = window, period
        self._capacity: int | None = None  # known at the first eviction
        self._first_duel: int | None = None  # the step the first duel begins
        self._choice: str | None = None  # the duels' winner so far
        self._score: dict[str, float] = {}  # each candidate's misses in the duels, fading by half every 2 duels
        self._shadows: dict[str, _Shadow] = {}  # by candidate, while a duel runs
        self._last_layer: int | None = None
        self._layer_keys: set[ExpertKey] = set()  # keys of the layer being served (pinned together)

    def estimate_with(self, estimate: ReuseEstimate) -> None:
        """Add eviction by `estimate` (a trained reuse model) to the candidates, from now on (before the first use)."""
        self.estimate = estimate

    def on_layer(self, layer: int) -> None:
        self.lrfu.on_layer(layer)
        if self._last_layer is None or layer <= self._last_layer:  # a new forward step: back to the first layer
            self.step += 1
            if self.estimate is not None:
                self.estimate.begin_step(self.step)
            if self._first_duel is not None and self.step >= self._first_duel:
                phase = (self.step - self._first_duel) % self.period
                if self._shadows and phase in (0, self.window):  # 0: a window as long as its period ends here
                    self._end_duel()
                if phase == 0:
                    self._start_duel()
        self._last_layer = layer
        self._layer_keys = set()

    def _end_duel(self) -> None:
        score = self._score
        for name, shadow in self._shadows.items():
            score[name] = score.get(name, 0.0) * _DUEL_FADE + shadow.misses
        self._choice = min(score, key=score.__getitem__)  # ties: the first, as inserted
        self._shadows = {}

    def _start_duel(self) -> None:
        assert self._capacity is not None
        resident = list(self._order)  # least recently used first
        victims = {"lrfu": self.lrfu.victim, "lru": lambda keys: keys[0]}
        if self.estimate is not None:
            victims = {"reuse": self._least_likely, **victims}
        self._shadows = {name: _Shadow(self._capacity, victim, 1.0, resident) for name, victim in victims.items()}

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.lrfu.on_access(key)
        if self.estimate is not None:
            self.estimate.on_use(key, self.step)
        if self._shadows:
            self._layer_keys.add(key)
            for shadow in self._shadows.values():
                shadow.access(key, self._layer_keys)

    @property
    def choice(self) -> str:
        """The candidate evictions follow now: "reuse", "lrfu" or "lru" (the duels' winner so far; before the first
        duel ends, the trained model if there is one, else LRFU)."""
        if self._choice is not None:
            return self._choice
        return "reuse" if self.estimate is not None else "lrfu"

    @property
    def by_recency(self) -> bool:
        """Whether evictions are LRU's (its shadows have missed least in the duels)."""
        return self.choice == "lru"

    def _least_likely(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        assert self.estimate is not None
        return least_likely(self.estimate, candidates)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        if self._capacity is None:  # the first eviction: every slot is taken, so this is the capacity
            self._capacity, self._first_duel = len(self._order), self.step + 1
        choice = self.choice
        if choice == "lrfu":
            return self.lrfu.victim(candidates)
        if choice == "reuse":
            allowed = set(candidates)
            return self._least_likely([k for k in self._order if k in allowed])  # least recently used first
        return super().victim(candidates)


class PredictivePolicy(LRUPolicy):
    """Evicts the expert least likely to be used again; predicted experts are evicted only when nothing else can be.

    The prefetcher (`moeflow.offload.prefetch.PredictivePrefetcher`) protects the experts it reads ahead
    and, once a layer's real routing is known, releases them and demotes the wrong ones (the next
    victims). It also tells the policy what it expects of the rest of the step (`expect`: the
    calibrated probability that a resident expert is used by an upcoming layer). Every other expert
    is worth `NextUse`'s estimate that its layer uses it next time (or, with `estimate_with`, a trained
    model's estimate that it is used within its layer's next few runs: `moeflow.offload.reuse`); the
    victim is the unprotected candidate worth least, the least recently used among equals.

    An estimate learned from the past can be worse than recency (routing with no structure to learn,
    a working set exactly the size of the cache): from the first eviction on, two shadow caches of the
    same size replay the real access stream, one evicting by the estimate and one by recency. While
    recency has missed less recently, the policy evicts as LRU does (wrong predictions still first)
    and the prefetcher reads nothing ahead: it does no worse than the better of the two by more than
    the time it takes to notice. While `dormant` (the prefetcher's `PredictionTrial` has found decoding
    faster without prediction) it is plain LRU and learns nothing, which costs what LRU costs; with a
    trained estimate (`estimate_with`) it goes on evicting by it, since keeping a trained model's inputs
    up to date is cheap (the policy's bookkeeping with the shipped model's: 134 us a token, 145 with `NextUse`,
    bench/predictor_cost.py) and pausing prediction is about the predictor's calls and the reads ahead, not
    about eviction.
    """

    name = "predictive"

    def __init__(self, *, half_life: float = 8.0, markov_weight: float = 0.5, shadow_half_life: float = 64.0) -> None:
        super().__init__()
        self._protected: set[ExpertKey] = set()
        self._demoted: set[ExpertKey] = set()
        self._expected: dict[ExpertKey, float] = {}
        self.next_use: ReuseEstimate = NextUse(half_life=half_life, markov_weight=markov_weight)
        self.step = 0
        self._shadow_decay = 0.5 ** (1.0 / shadow_half_life)
        self._shadows: tuple[_Shadow, _Shadow] | None = None
        self._layer_keys: set[ExpertKey] = set()  # keys of the layer being served (pinned together)
        self._layer: tuple[int, int] | None = None  # (step, layer) of `_layer_keys`
        self.dormant = False  # prediction paused (`PredictionTrial`): evict as LRU and learn nothing...
        self._trained = False  # ...unless the estimate is a trained model (`estimate_with`)

    def _start_shadows(self, capacity: int) -> None:
        self._shadows = (
            _Shadow(capacity, self._least_likely, self._shadow_decay),
            _Shadow(capacity, lambda candidates: candidates[0], self._shadow_decay),  # oldest first: LRU
        )

    def estimate_with(self, estimate: ReuseEstimate) -> None:
        """Estimate experts' reuse with `estimate`, a trained model, from now on (before the first use)."""
        self.next_use = estimate
        self._trained = True

    # ---- what the prefetcher tells the policy ---------------------------------------------------------

    def begin_step(self) -> None:
        self.step += 1
        self.next_use.begin_step(self.step)
        self._expected.clear()
        if self._shadows is not None:
            for shadow in self._shadows:
                shadow.end_step()

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

    def layer_ran(self, previous: Sequence[ExpertKey], issued: Sequence[ExpertKey], predicted: Sequence[ExpertKey],
                  wrong: Sequence[ExpertKey], current: Sequence[ExpertKey]) -> None:
        """A layer's routing is known (the prefetcher's correction, in one call): the previous layer's experts and
        this layer's reads ahead are released, its predictions forgotten, the wrong reads ahead demoted, and its
        experts (`current`) protected until the next layer's routing is known: its reads ahead must not evict them."""
        protected, expected = self._protected, self._expected
        protected.difference_update(previous)
        protected.difference_update(issued)
        for key in predicted:
            expected.pop(key, None)
        if wrong:
            self.demote(wrong)
        protected.update(current)

    # ---- what the policy knows --------------------------------------------------------------------------

    @property
    def protected(self) -> frozenset[ExpertKey]:
        return frozenset(self._protected)

    @property
    def by_recency(self) -> bool:
        """Whether recency has recently missed less than the estimate (then the policy evicts as LRU)."""
        return self._shadows is not None and self._shadows[1].misses < self._shadows[0].misses

    def worth(self, key: ExpertKey) -> float:
        """P(`key` is used when its layer next runs): 0 if demoted, else `NextUse`'s, raised to what is expected."""
        return self.worths((key,))[0]

    def worths(self, keys: Sequence[ExpertKey]) -> list[float]:
        """`worth` of each of `keys`, in one pass (`NextUse.probabilities`)."""
        worths = self.next_use.probabilities(keys)
        if self._expected:
            raised = list(map(self._expected.get, keys))
            worths = [w if x is None or x <= w else x for w, x in zip(worths, raised)]
        if self._demoted:
            demoted = self._demoted
            worths = [0.0 if k in demoted else w for k, w in zip(keys, worths)]
        return worths

    def eviction_worths(self, n: int) -> list[float]:
        """The worth of the next `n` victims among the resident unprotected experts, in eviction order."""
        keys = [k for k in self._order if k not in self._protected]
        if self.by_recency:  # the demoted first, then least recently used first
            demoted = self._demoted
            keys = [k for k in keys if k in demoted] + [k for k in keys if k not in demoted]
            return self.worths(keys[:n])
        return sorted(self.worths(keys))[:n]  # the least worth first (which key among equals does not matter here)

    def resident(self, key: ExpertKey) -> bool:
        return key in self._order

    def _least_likely(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        return least_likely(self.next_use, candidates)

    # ---- the policy protocol ----------------------------------------------------------------------------

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self._demoted.discard(key)
        if self.dormant and not self._trained:
            return
        if self._layer != (self.step, key[0]):
            self._layer, self._layer_keys = (self.step, key[0]), set()
        self._layer_keys.add(key)
        if self._shadows is not None:
            for shadow in self._shadows:
                shadow.access(key, self._layer_keys)
        self.next_use.on_use(key, self.step)

    def on_evict(self, key: ExpertKey) -> None:
        super().on_evict(key)
        self._protected.discard(key)
        self._demoted.discard(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        if self._shadows is None:  # the first eviction: every slot is taken, so this is the capacity
            self._start_shadows(len(self._order))
        allowed = set(candidates)
        unprotected = allowed - self._protected
        pick_from = unprotected or allowed
        ordered = [k for k in self._order if k in pick_from]  # least recently used first
        if (self.dormant and not self._trained) or self.by_recency:
            return next((k for k in ordered if k in self._demoted), ordered[0])
        worths = self.worths(ordered)
        return ordered[worths.index(min(worths))]  # ties go to the least recently used


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


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "auto": AutoPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "lrfu": LRFUPolicy, "predictive": PredictivePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """A live eviction policy by name (`moeflow.config.LivePolicy`; belady needs a trace: `BeladyPolicy`)."""
    return POLICIES[name]()
