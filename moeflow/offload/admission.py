"""Prefetch admission by expected cost: read a predicted expert ahead only when it pays.

A prefetch that is used saves the stall of a demand read, but only the part of the read that
overlaps compute. The compute of the `lookahead` layers before the expert's own can hide `overlap`
reads (lookahead x compute per layer / read time: well above 1 when reading an expert is cheap
next to a layer's compute, near 0 when the link is the bottleneck and every byte costs time); one
layer's reads ahead share that window, so its i-th read (0-based) hides `hidden = clamp(overlap - i,
0, 1)` of itself. A prefetch that is not used costs the part of its read that does not overlap, and
the slot it takes evicts a victim that may be needed again (its reuse probability `r`: one demand
re-read). A read never hides all of its cost: it takes the link, cores and memory bandwidth from
demand reads and compute (`contention`, a share of one read: at least the share of the time the link
is busy reading, as the prefetcher measures it, since on a link that reads all the time every read
ahead delays the reads behind it by its whole length). So, in units of one read, with `p` the
calibrated probability that the expert is used:

    admit  <=>  p * hidden  >  (1 - p) * (max(1 - hidden, contention) + r)

(if the prefetch is used, the victim would have been evicted by the demand read anyway). Every
term is an estimate made online from what the cache and the predictor have shown so far:

- `Calibration`: the realised rate at which predictions of each raw probability were right,
  decayed so recent outcomes weigh most. A predictor that is wrong (random routing, an adversary)
  is soon believed at its real precision, and admission closes: the cache behaves as plain LRU.
- `NextUse`: how likely a resident expert is used the next time its layer runs, from what followed
  what in the layer's routing so far and from the expert's recent use rate.
- `admit`: the decision for one layer's candidates against the eviction order, under a cap of
  prefetch reads (the prefetcher caps them per token: a byte cap, since every expert has one size).

Pure Python and deterministic; `moeflow.offload.prefetch` wires it to the cache.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from moeflow.model.checkpoint import ExpertKey


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    """How the predictive prefetcher decides what to read ahead."""

    overlap: float | None = None  # reads the lookahead window of compute hides; None: measured online
    read_share: float = 0.5  # cap: reads ahead per token <= this share of the experts offered (width x layers)
    # share of a read's cost that overlap never hides, at least (an assumption); the prefetcher raises it to the
    # share of the time it measures the link reading (`PredictivePrefetcher.contention`)
    contention: float = 0.25
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
        # Outcomes fade by `decay` each, so a bin's weights are kept scaled up by 1 / `_scale` (`_scale` =
        # decay ** outcomes since the last rescale): an outcome adds 1 / `_scale`, and reading a bin costs one
        # multiplication instead of bringing its fade up to date. Lists by bin (the rank-only bins appended as
        # they are first needed): `table` is then one comprehension, no call per bin.
        self._hits: list[float] = []
        self._seen: list[float] = []
        self._prior_weights: list[float] = []  # prior_weight x the bin's prior
        self._scale = 1.0
        self._grow(self.bins)

    def _grow(self, n: int) -> None:
        """Bins up to `n` (exclusive) exist."""
        for b in range(len(self._hits), n):
            self._hits.append(0.0)
            self._seen.append(0.0)
            self._prior_weights.append(self.prior_weight * self._prior(b))

    def bin_of(self, raw: float | None, rank: int = 0) -> int:
        """The bin of a prediction: of its raw probability, or (rank only) of its rank, after the probability bins."""
        if raw is None:
            return self.bins + rank
        return self.bins_of((raw,))[0]

    def bins_of(self, raws: Iterable[float]) -> list[int]:
        """`bin_of` of each raw probability, in one call (an offer's, per layer rather than per prediction)."""
        bins, top = self.bins, self.bins - 1
        return [min(int(raw * bins), top) if raw > 0 else 0 for raw in raws]

    def _prior(self, b: int) -> float:
        """What an empty bin believes: its raw probability's midpoint, or 1/2 for the best rank and less after."""
        return (b + 0.5) / self.bins if b < self.bins else 1.0 / (b - self.bins + 2)

    def probability(self, raw: float | None, rank: int = 0) -> float:
        return self._calibrated(self.bin_of(raw, rank))

    def table(self, ranks: int) -> list[float]:
        """`probability` of every bin, indexed by `bin_of` (rank-only bins for ranks below `ranks`): what an offer
        of several predictions reads while the calibration stands still."""
        n = self.bins + ranks
        if len(self._hits) < n:
            self._grow(n)
        scale, weight = self._scale, self.prior_weight
        table = [(h * scale + q) / (s * scale + weight) for h, s, q in zip(self._hits, self._seen, self._prior_weights)]
        return table if len(table) == n else table[:n]

    def _calibrated(self, b: int) -> float:
        if b >= len(self._hits):
            self._grow(b + 1)
        scale = self._scale
        return (self._hits[b] * scale + self._prior_weights[b]) / (self._seen[b] * scale + self.prior_weight)

    def observe(self, raw: float | None, used: bool, rank: int = 0) -> None:
        self._scale *= self._decay
        if self._scale < 1e-200:  # fold the scale into the weights before it underflows
            self._hits = [w * self._scale for w in self._hits]
            self._seen = [w * self._scale for w in self._seen]
            self._scale = 1.0
        b = self.bin_of(raw, rank)
        if b >= len(self._hits):
            self._grow(b + 1)
        weight = 1.0 / self._scale
        if used:
            self._hits[b] += weight
        self._seen[b] += weight


class NextUse:
    """P(a resident expert is used the next time its layer runs), learned online from the experts' uses.

    Two estimates, averaged (`markov_weight`): a per-layer Markov chain over steps (how often expert `e`
    followed each expert of the layer's latest step, smoothed towards the layer's mean use rate) and the
    expert's recent use rate (uses per step, decayed with `half_life` steps). The first catches routing
    that follows routing (text that repeats, code structure), the second the experts a passage keeps
    using. Both know only the past, so both settle at the plain use rate when routing is random. For a
    layer that has not run yet this step, its latest step is the previous one: the estimate is for this
    step; for one that has, for the next.
    """

    def __init__(self, *, half_life: float = 12.0, markov_weight: float = 0.5, smoothing: float = 1.0) -> None:
        if half_life <= 0 or not 0.0 <= markov_weight <= 1.0 or smoothing <= 0:
            raise ValueError("half_life and smoothing must be > 0, markov_weight in [0, 1]")
        self._decay = 0.5 ** (1.0 / half_life)
        self.markov_weight = markov_weight
        self.smoothing = smoothing
        self._layers: dict[int, _LayerUses] = {}
        self._step = 0  # the latest step seen
        # Probabilities already worked out, by key, until a new step (the use rates decay) or a use in the key's
        # layer changes them: a scan of the resident experts is then one C-level lookup per key.
        self._memo: dict[ExpertKey, float] = {}
        self._memo_keys: dict[int, list[ExpertKey]] = {}  # layer -> its keys in `_memo`

    def begin_step(self, step: int) -> None:
        """Nothing to do: for `NextUse` a step begins with its first use."""

    def on_use(self, key: ExpertKey, step: int) -> None:
        """`key` is used at `step` (repeats within a step count once)."""
        layer, e = key
        if step > self._step:
            self._step = step
            self._memo.clear()
            self._memo_keys.clear()
        uses = self._layers.get(layer)
        if uses is None:
            uses = self._layers[layer] = _LayerUses()
        if uses.use(e, step, self._decay):
            memo = self._memo
            for k in self._memo_keys.pop(layer, ()):
                memo.pop(k, None)

    def probability(self, key: ExpertKey) -> float:
        return self.probabilities((key,))[0]

    def probabilities(self, keys: Sequence[ExpertKey]) -> list[float]:
        """`probability` of each of `keys`, in one call: what a scan of the resident experts asks, tens of keys a
        few times a token, mostly answered from the memo."""
        out = list(map(self._memo.get, keys))
        if None in out:
            for i, p in enumerate(out):
                if p is None:
                    out[i] = self._work_out(keys[i])
        return out

    def _work_out(self, key: ExpertKey) -> float:
        layer, e = key
        uses = self._layers.get(layer)
        if uses is None or uses.steps == 0:
            p = 0.0
        else:
            p = uses.next_use(e, self._step, self.smoothing, self.markov_weight, self._decay)
        self._memo[key] = p
        self._memo_keys.setdefault(layer, []).append(key)
        return p


class _LayerUses:
    """One layer's history for `NextUse`: which experts followed which (counts), each expert's decayed use
    count. Plain lists: a layer has tens of experts and is touched a few times a step, where numpy's
    per-call overhead is most of the cost (the live policy calls this on every expert access)."""

    def __init__(self) -> None:
        self.size = 0
        self.follows: list[list[float]] = []  # [a][e]: steps in which e followed a step using a
        self.steps_after: list[float] = []  # [a]: steps that followed a step using a
        self.count: list[float] = []  # decayed use count, brought up to date at step `at`
        self.at: list[int] = []
        self.seen: list[bool] = []
        self.latest: list[int] = []  # the experts of the layer's latest step
        self.before: list[int] = []  # ...and of the step before it
        self.latest_step: int | None = None
        self.steps = self.uses = self.distinct = 0

    def _grow(self, e: int) -> None:
        size = max(e + 1, 2 * self.size)
        grow = size - self.size
        for row in self.follows:
            row += [0.0] * grow
        self.follows += [[0.0] * size for _ in range(grow)]
        self.steps_after += [0.0] * grow
        self.count += [0.0] * grow
        self.at += [0] * grow
        self.seen += [False] * grow
        self.size = size

    def use(self, e: int, step: int, decay: float) -> bool:
        """Count a use of `e` at `step`; whether it changed anything (a repeat within a step does not)."""
        if e >= self.size:
            self._grow(e)
        if self.latest_step != step:
            if self.latest_step is not None:
                for a in self.latest:
                    self.steps_after[a] += 1.0
            self.before, self.latest, self.latest_step = self.latest if self.latest_step is not None else [], [], step
            self.steps += 1
        if e in self.latest:
            return False
        self.latest.append(e)
        self.uses += 1
        if not self.seen[e]:
            self.seen[e] = True
            self.distinct += 1
        for a in self.before:
            self.follows[a][e] += 1.0
        self.count[e] = self.count[e] * decay ** (step - self.at[e]) + 1.0
        self.at[e] = step
        return True

    def next_use(self, e: int, step: int, smoothing: float, markov_weight: float, decay: float) -> float:
        """`NextUse`'s estimate for `e` at `step` (the layer has run at least once), in one call: every key an
        eviction scan works out pays for it. The Markov estimate that `e` follows the layer's latest experts (the
        mean over them of the smoothed share of their steps that `e` followed; smoothed towards the layer's mean
        use rate, an expert per step; that rate alone if the layer has no latest experts), weighed with `e`'s
        decayed use rate."""
        mean = min(self.uses / self.steps / max(self.distinct, 1), 1.0)
        known = e < self.size
        latest = self.latest
        if latest:
            prior = smoothing * mean
            total = 0.0
            after = self.steps_after
            if known:
                follows = self.follows
                for a in latest:
                    total += (follows[a][e] + prior) / (after[a] + smoothing)
            else:  # an expert the layer never used: the smoothed prior alone
                for a in latest:
                    total += prior / (after[a] + smoothing)
            markov = min(total / len(latest), 1.0)
        else:
            markov = mean
        rate = self.count[e] * decay ** max(step - self.at[e], 0) * (1.0 - decay) if known else 0.0
        return markov_weight * markov + (1.0 - markov_weight) * min(rate, 1.0)


class PredictionTrial:
    """Whether predicting makes decoding faster, found by timing it: the wall-clock arbiter of prediction.

    Every estimate above prices reads; none prices the prediction itself. Calling the predictor, offering,
    admitting and scoring cost CPU time on the compute thread every layer of every step, and reads ahead
    compete with the demand reads and with compute for the cores. Where reads are cheap next to that (a
    small model, a fast link) prediction slows decoding down, however right it is; where they are dear it
    pays many times over. Rather than model that, the trial measures it, in seconds per row of decode steps.

    Steps run in the best mode so far (at first: predicting). Every `gap` measured steps the other mode
    (predicting, or plain LRU with no prediction at all) is tried: from `window` steps on, its steps are
    compared with the best mode's latest `history` steps (Welch's test: the difference of the means
    against `z` standard errors). It becomes the best when it is faster by more than `margin` beyond the
    noise; the trial ends as a loss as soon as it is slower beyond the noise, or after `max_window` steps
    that settled nothing (the best mode stays: only a clear win moves it). Each loss makes the next trial
    `growth` times rarer (up to `max_gap`), so a mode that keeps losing costs less and less of the run; a
    win brings the gap back to `first_gap`. Step times vary with the misses each token meets, so a small
    real difference may never be clear: then nothing changes. The first `settle` steps after a switch are
    not measured: the cache is still changing hands between the modes, and those steps run on what the
    other mode left resident. With one such step, the first steps of a plain-LRU trial ran on the experts
    the predictor had read ahead, looked fast, and won: on the I/O-bound benchmark model at 25% (2-core
    AMD EPYC VM, 3 interleaved rounds, 4 prompts x 64 tokens, path) decoding predicted on only 13-19% of
    the steps, with 39-41 ms of stall per token, against 84-86% and 31-33 ms with 4 (always predicting:
    30-32 ms; LRU 36-46 ms). Nor are the first `after_prefill` decode steps after a prefill (`interrupt`), which
    run on what the prefill left resident whatever the mode.
    """

    def __init__(
        self,
        *,
        window: int = 4,
        max_window: int = 12,
        history: int = 32,
        z: float = 2.0,
        settle: int = 4,
        margin: float = 0.03,
        first_gap: int = 8,
        growth: int = 4,
        max_gap: int = 1024,
        after_prefill: int = 2,
    ) -> None:
        if not 2 <= window <= max_window <= history or settle < 0 or z < 0 or not 0 <= margin < 1:
            raise ValueError("need 2 <= window <= max_window <= history, settle >= 0, z >= 0, margin in [0, 1)")
        if after_prefill < 0:
            raise ValueError(f"after_prefill must be >= 0 steps, got {after_prefill}")
        if first_gap < 1 or growth < 1 or max_gap < first_gap:
            raise ValueError("need first_gap >= 1, growth >= 1, max_gap >= first_gap")
        self.window, self.max_window, self.z, self.settle, self.margin = window, max_window, z, settle, margin
        self.first_gap, self.growth, self.max_gap = first_gap, growth, max_gap
        self.after_prefill = after_prefill
        self.predicting = True  # the mode of the next step
        self.best = True  # the mode the run keeps to between trials
        self.gap = first_gap  # measured steps of the best mode before the other is tried
        self.trials = self.switches = 0
        self.seconds_per_row: dict[bool, float] = {}  # each mode's mean over its latest measured steps
        self._best: deque[float] = deque(maxlen=history)  # seconds per row of the best mode's latest steps
        self._trial: list[float] = []  # ...and of the trial in progress
        self._since = 0  # measured steps of the best mode since the last trial
        self._skip = settle

    def interrupt(self) -> None:
        """A forward that is not a decode step ran (a prefill): the next `after_prefill` decode steps are not measured.
        They run on what the prefill left resident, whichever the mode: on the random-routing bench model at 25%
        (6 prompts x 64 tokens, ad hoc, 2026-12-05) the first decode step after a prefill took 168 ms (median), the
        second 87, the later ones 41; the trial's first mode always ran the first prompt's (there gate's trial measured
        91.9 ms a row predicting against 59.4 without, at LRU's bytes: bench/results/expertflow_random_lens_gated.json).
        A server whose prefills come every `after_prefill` steps or more often measures nothing: its mode stays."""
        self._skip = max(self._skip, self.after_prefill)

    def observe(self, seconds: float, rows: int) -> None:
        """A decode step of the current mode took `seconds` for `rows` rows; may change the next step's mode."""
        if self._skip:
            self._skip -= 1
            return
        x = seconds / max(rows, 1)
        if self.predicting == self.best:
            self._best.append(x)
            self._since += 1
            if self._since >= self.gap and len(self._best) >= self.window:
                self.seconds_per_row[self.best] = _mean(self._best)
                self.trials += 1
                self._trial = []
                self._set(not self.best)
            return
        self._trial.append(x)
        if len(self._trial) < self.window:
            return
        verdict = self._verdict()
        if verdict is None and len(self._trial) < self.max_window:
            return
        self.seconds_per_row[self.predicting] = _mean(self._trial)
        self._since = 0
        if verdict is True:  # the other mode won: it is the best now
            self.best = self.predicting
            self.gap = self.first_gap
            self.switches += 1
            self._best = deque(self._trial, maxlen=self._best.maxlen)
        else:
            self.gap = min(self.gap * self.growth, self.max_gap)
        self._set(self.best)

    def _verdict(self) -> bool | None:
        """True: the trial's mode is faster beyond margin and noise; False: slower beyond noise; None: not clear."""
        best, trial = _mean(self._best), _mean(self._trial)
        se = math.sqrt(_var(self._best) / len(self._best) + _var(self._trial) / len(self._trial))
        if best - trial > self.margin * best + self.z * se:
            return True
        if trial - best > self.z * se:
            return False
        return None

    def _set(self, predicting: bool) -> None:
        if predicting != self.predicting:
            self.predicting = predicting
            self._skip = self.settle


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
