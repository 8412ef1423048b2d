"""Prefetch admission by expected cost: read a predicted expert ahead only when it pays.

A prefetch that is used saves the stall of a demand read, but only the part of the read that
overlaps compute. The compute of the `lookahead` layers before the expert's own can hide `overlap`
reads (lookahead x compute per layer / read time: well above 1 when reading an expert is cheap
next to a layer's compute, near 0 when the link is the bottleneck and every byte costs time); one
layer's reads ahead share that window, so its i-th read (0-based) hides `hidden = clamp(overlap - i,
0, 1)` of itself. A prefetch that is not used costs the part of its read that does not overlap, and
the slot it takes evicts a victim that may be needed again (its reuse probability `r`: one demand
re-read). A read never hides all of its cost: it takes the link, cores and memory bandwidth from
demand reads and compute (`contention`, a share of one read). So, in units of one read, with `p`
the calibrated probability that the expert is used:

    admit  <=>  p * hidden  >  (1 - p) * (max(1 - hidden, contention) + r)

(if the prefetch is used, the victim would have been evicted by the demand read anyway). Every
term is an estimate made online from what the cache and the predictor have shown so far:

- `Calibration`: the realised rate at which predictions of each raw probability were right,
  decayed so recent outcomes weigh most. A predictor that is wrong (random routing, an adversary)
  is soon believed at its real precision, and admission closes: the cache behaves as plain LRU.
- `ReuseRates`: how likely a resident expert that has been idle for `a` steps is used at its next
  step, from the gaps between uses observed so far (a discrete hazard).
- `admit`: the decision for one layer's candidates against the eviction order, under a cap of
  prefetch reads (the prefetcher caps them per token: a byte cap, since every expert has one size).

Pure Python and deterministic; `moeflow.offload.prefetch` wires it to the cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from moeflow.model.checkpoint import ExpertKey


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    """How the predictive prefetcher decides what to read ahead."""

    overlap: float | None = None  # reads the lookahead window of compute hides; None: measured online
    read_share: float = 0.5  # cap: reads ahead per token <= this share of the experts offered (width x layers)
    contention: float = 0.25  # share of a read's cost that overlap never hides (an assumption, not measured)
    bins: int = 10  # calibration bins over [0, 1]
    prior_weight: float = 4.0  # pseudo-outcomes that pull an empty bin towards its raw probability
    half_life: float = 512.0  # outcomes after which an old outcome weighs half

    def __post_init__(self) -> None:
        if self.overlap is not None and self.overlap < 0:
            raise ValueError(f"overlap must be >= 0 (reads hidden behind the lookahead's compute), got {self.overlap}")
        if self.read_share < 0 or self.bins < 1 or self.prior_weight <= 0 or self.half_life <= 0:
            raise ValueError("read_share must be >= 0; bins, prior_weight and half_life > 0")
        if not 0.0 <= self.contention <= 1.0:
            raise ValueError(f"contention must be in [0, 1] (a share of one read), got {self.contention}")


def net_gain(p: float, r: float, hidden: float, contention: float) -> float:
    """Expected time saved by admitting a prefetch, in reads: used with probability `p`, its victim reused
    with probability `r` (0 for a free slot), `hidden` of a read overlapping compute, `contention` of it never."""
    return p * hidden - (1.0 - p) * (max(1.0 - hidden, contention) + r)


def admit(
    candidates: Sequence[tuple[ExpertKey, float]],
    *,
    free_slots: int,
    victims: Iterable[float],
    overlap: float,
    contention: float,
    max_reads: int,
) -> list[ExpertKey]:
    """Which of `candidates` (non-resident experts with their calibrated probability of use) to read ahead.

    The most likely first; each admitted one takes a free slot while there is one, else the next victim
    in eviction order (`victims`: their reuse probabilities, best victim first), and hides less of its
    read than the one before (`overlap`). Stops at `max_reads`, at the first candidate that does not pay
    (probabilities and hidden shares only fall, victims only get dearer), and when nothing is left to evict.
    """
    admitted: list[ExpertKey] = []
    victim_iter: Iterator[float] = iter(victims)
    for key, p in sorted(candidates, key=lambda c: -c[1]):
        if len(admitted) >= max_reads:
            break
        if free_slots > 0:
            r = 0.0
        else:
            r = next(victim_iter, math.inf)
            if r == math.inf:
                break
        hidden = min(max(overlap - len(admitted), 0.0), 1.0)
        if net_gain(p, r, hidden, contention) <= 0.0:
            break  # candidates come most likely first and victims least valuable first: none later pays
        if free_slots > 0:
            free_slots -= 1
        admitted.append(key)
    return admitted


class Calibration:
    """Realised P(used) of predictions, per bin of the probability the predictor gave them.

    An empty bin believes the predictor (its raw probability, with `prior_weight` pseudo-outcomes); each
    outcome moves it towards what really happened, old outcomes fading with `half_life`. Predictions
    without a probability (rank only) are calibrated per rank instead.
    """

    def __init__(self, config: AdmissionConfig) -> None:
        self.bins = config.bins
        self.prior_weight = config.prior_weight
        self._decay = 0.5 ** (1.0 / config.half_life)
        self._hits: dict[int, float] = {}
        self._seen: dict[int, float] = {}
        self._tick: dict[int, int] = {}  # outcome count when the bin was last brought up to date
        self._outcomes = 0

    def _bin(self, raw: float | None, rank: int) -> tuple[int, float]:
        if raw is None:
            return self.bins + rank, 1.0 / (rank + 2)  # rank-only: prior 1/2 for the best, less after
        b = min(int(raw * self.bins), self.bins - 1) if raw > 0 else 0
        return b, (b + 0.5) / self.bins

    def _fade(self, b: int) -> None:
        last = self._tick.get(b, self._outcomes)
        if last != self._outcomes:
            f = self._decay ** (self._outcomes - last)
            self._hits[b] = self._hits.get(b, 0.0) * f
            self._seen[b] = self._seen.get(b, 0.0) * f
        self._tick[b] = self._outcomes

    def probability(self, raw: float | None, rank: int = 0) -> float:
        b, prior = self._bin(raw, rank)
        self._fade(b)
        return (self._hits.get(b, 0.0) + self.prior_weight * prior) / (self._seen.get(b, 0.0) + self.prior_weight)

    def observe(self, raw: float | None, used: bool, rank: int = 0) -> None:
        self._outcomes += 1
        b, _ = self._bin(raw, rank)
        self._fade(b)
        self._hits[b] = self._hits.get(b, 0.0) + float(used)
        self._seen[b] = self._seen.get(b, 0.0) + 1.0

    def table(self) -> list[tuple[float, float, float]]:
        """(raw probability of the bin, calibrated probability, weight of outcomes) per probability bin."""
        return [((b + 0.5) / self.bins, self.probability((b + 0.5) / self.bins), self._seen.get(b, 0.0))
                for b in range(self.bins)]


class ReuseRates:
    """P(a resident expert is used at its next step | it has been idle `a` steps), from observed gaps.

    Every use of an expert used before records the gap in steps since its previous use; the hazard
    h(a) = #gaps == a / #gaps >= a (gaps beyond `max_gap` pooled) answers for an expert idle `a` steps
    (a >= 1; an expert used this step counts as a = 1). Before any gap is seen, `prior` answers.
    """

    def __init__(self, *, max_gap: int = 64, prior: float = 0.5, refresh: int = 64) -> None:
        self.max_gap = max_gap
        self.prior = prior
        self._refresh = refresh
        self._gaps = [0] * (max_gap + 1)  # index g: gaps of g steps (max_gap: that many or more)
        self._last: dict[ExpertKey, int] = {}
        self._hazard: list[float] | None = None
        self._since_refresh = 0
        self.step = 0

    def on_use(self, key: ExpertKey) -> None:
        last = self._last.get(key)
        if last is not None and last < self.step:
            self._gaps[min(self.step - last, self.max_gap)] += 1
            self._since_refresh += 1
            if self._since_refresh >= self._refresh:
                self._hazard = None
        self._last[key] = self.step

    def idle_steps(self, key: ExpertKey) -> int | None:
        last = self._last.get(key)
        return None if last is None else self.step - last

    def reuse(self, key: ExpertKey) -> float:
        """Probability `key` is used at its next step (never used yet: the prior)."""
        a = self.idle_steps(key)
        if a is None:
            return self.prior
        return self.hazard(max(a, 1))

    def hazard(self, a: int) -> float:
        if self._hazard is None:
            self._hazard = self._compute()
        return self._hazard[min(a, self.max_gap)]

    def _compute(self) -> list[float]:
        self._since_refresh = 0
        h = [self.prior] * (self.max_gap + 1)
        at_least = 0
        for g in range(self.max_gap, 0, -1):
            at_least += self._gaps[g]
            # One pseudo-gap at the prior keeps thin tails from jumping to 0 or 1.
            h[g] = (self._gaps[g] + self.prior) / (at_least + 1.0)
        return h
