"""Predictive prefetch with admission and correction: read ahead only what pays, fix mistakes.

One decode step walks the MoE layers in order (positions 0..L-1 of `layers`). Predictions for a
layer are *offered* whenever a predictor has them (a context predictor offers every layer before
the forward; gate lookahead offers layer i+d while layer i runs), as ranked experts per token with
the predictor's probability that each is used. Offered experts become the step's expectations at
once: the eviction policy (`PredictivePolicy`) keeps a resident expert an upcoming layer is likely
to use. Once the step has reached `window` layers before the layer (the predictions' `lookahead`, or more
for offers made before the forward where reads are dear: `read_ahead`), the prefetcher decides which
non-resident experts to read ahead (`moeflow.offload.admission.admit`: calibrated probability of
use x the part of the read that overlaps compute, against the wasted read, at least the share of the
time the link is busy, and the reuse of the victim it evicts, under a cap of reads per token) and
protects those from eviction. When the layer's real routing is known (`on_routing`, just before the
layer acquires its experts) every offered prediction is scored for calibration, the reads ahead are
released, the wrong ones still queued dropped and the rest demoted to the front of the eviction
order; the missed experts are then read on demand by the cache (which also takes over a right
prediction whose read is still queued).
The cache decides hits and misses, so correctness never depends on a prediction: a wrong one costs
a wasted read, never a wrong output. During a decode step's last layer, `offer_next_step` offers
the *next* step's first layer (what `moeflow.predictor.ahead` predicts of the next token): admitted
the same way, read once that last layer's own reads are in, and kept protected across the step's
end until the first layer's routing scores them. With a `PredictionTrial` the prefetcher times its
decode steps and, while the trial finds them faster without prediction, does nothing at all: the
predictor is not called (`predicting` is False) and the policy is plain LRU
(`PredictivePolicy.dormant`), or evicts by its trained reuse model if it has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import NamedTuple

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import ExpertKey
from moeflow.offload.admission import AdmissionConfig, Calibration, PredictionTrial, admit
from moeflow.offload.cache import ExpertCache
from moeflow.offload.plans import PrefetchPlan
from moeflow.offload.policy import PredictivePolicy


@dataclass
class PrefetchCounters:
    steps: int = 0
    offered: int = 0  # distinct experts predicted (after the width cap)
    issued: int = 0  # prefetch reads queued (admitted and not resident)
    refused: int = 0  # predicted, not resident, and not worth reading ahead (or over the cap)
    cancelled: int = 0  # queued reads dropped before they started: their layer ran without them
    correct: int = 0  # predicted experts the layer then used
    used: int = 0  # experts the layers used
    dormant_steps: int = 0  # steps run without prediction (`PredictionTrial`)
    ahead_offered: int = 0  # `offer_next_step`: the next step's first-layer experts predicted
    ahead_issued: int = 0  # ...and read ahead during the last layer
    ahead_correct: int = 0  # ...of those reads, the ones the next step's first layer used

    @property
    def precision(self) -> float:
        return self.correct / self.offered if self.offered else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**vars(self), "precision": self.precision, "recall": self.recall}


class _Offers(NamedTuple):
    """One layer's offered experts, each once, as parallel sequences (one object a layer, not one an expert)."""

    experts: Sequence[int]
    raws: Sequence[float | None]  # the predictor's probability that some token of the step uses it (None: rank only)
    ranks: Sequence[int]  # its best rank among the step's tokens
    ps: Sequence[float]  # the calibrated probability that the step uses it, as the calibration stood when offered


class OverlapEstimate:
    """`overlap` measured online: how many expert reads the compute of `lookahead` layers can hide.

    Measured over windows of `every` consecutive decode steps that predicted, forward by forward (`begin` when
    one starts, `end` when it returns): compute per layer = (forward time - stall) / layers run, read time =
    stall / demand reads, from the cache's own statistics; `per_layer = compute / read`, smoothed, and
    `overlap = lookahead x per_layer`.
    Any other forward (a prefill, a step the trial ran without prediction) `interrupt`s the window and it is
    dropped: its stall and reads are another regime's, and the time between forwards is no layer's compute.
    Until the first estimate, `initial`.

    The same window measures `busy`: the share of its time, from its first forward's start to its last one's end,
    during which a read was in progress (the cache's `reading_s`, which the readers clock). Where the link reads all
    the time (an expert's read far dearer than its compute), a read ahead that is not used delays every read behind
    it by its whole length, not by the part that overlap leaves (admission's `contention`).
    """

    def __init__(
        self,
        cache: ExpertCache,
        *,
        layers: int,
        lookahead: int,
        every: int = 8,
        initial: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cache = cache
        self.layers = layers
        self.lookahead = lookahead
        self.every = every
        self.per_layer = initial / lookahead  # reads one layer's compute hides
        self.read_s: float | None = None  # seconds a demand read stalls, smoothed like `overlap`
        self.busy: float | None = None  # share of the time the link reads, smoothed like `overlap`
        self._clock = clock
        # The open window: forward seconds and steps so far, and (stall, misses, reading seconds, time) when it opened.
        self._seconds, self._steps = 0.0, 0
        self._mark: tuple[float, int, float, float] | None = None
        self._start: float | None = None  # when the measured forward began

    @property
    def overlap(self) -> float:
        return self.lookahead * self.per_layer

    def begin(self) -> None:
        """A decode step that predicts begins."""
        s = self.cache.stats() if self._mark is None else None
        self._start = self._clock()
        if s is not None:
            self._seconds, self._steps, self._mark = 0.0, 0, (s.stall_s, s.misses, s.reading_s, self._start)

    def end(self) -> float:
        """The forward `begin` marked has returned; the estimate, updated when this closed a window."""
        if self._start is None or self._mark is None:
            return self.overlap
        self._seconds += self._clock() - self._start
        self._steps += 1
        self._start = None
        if self._steps < self.every:
            return self.overlap
        s = self.cache.stats()
        stall, misses = s.stall_s - self._mark[0], s.misses - self._mark[1]
        reading, elapsed = s.reading_s - self._mark[2], self._clock() - self._mark[3]
        self._mark = None
        if misses > 0 and stall > 0:
            read_s = stall / misses
            compute_per_layer = max(self._seconds - stall, 0.0) / (self._steps * self.layers)
            self.per_layer = 0.7 * self.per_layer + 0.3 * compute_per_layer / read_s
            self.read_s = read_s if self.read_s is None else 0.7 * self.read_s + 0.3 * read_s
        if elapsed > 0:
            busy = min(reading / elapsed, 1.0)
            self.busy = busy if self.busy is None else 0.7 * self.busy + 0.3 * busy
        return self.overlap

    def interrupt(self) -> None:
        """A forward that is not measured: the open window is dropped."""
        self._mark = self._start = None


class PredictivePrefetcher:
    """Turns per-layer predictions into admitted `PrefetchPlan`s `lookahead` layers ahead, with correction.

    `issue` starts the reads (the engine's `TransferEngine.prefetch`; profiling replay passes a
    synchronous one). `width` caps how many experts per token are considered for one layer;
    `admission` decides which of them are read ahead. `trial` (the engine's; profiling replay has none and
    always predicts) decides from timed decode steps whether to predict at all.

    `read_ahead`: how many layers ahead to read what a predictor offers before `lookahead` makes it due (a
    whole-step predictor offers every layer before the forward; `moeflow.predictor.apply` sets it for those).
    None: `lookahead`, as for any offer; n >= 1: max(n, lookahead), fixed; 0: chosen at each step from the measured
    overlap, `lookahead` + 1 while one layer's compute hides less than one expert's read (`OverlapEstimate.per_layer`
    < 1: the link is the bottleneck), else `lookahead`. The `window` of layers read ahead sets the overlap admission
    assumes (window x per layer) and the slots one layer's reads may take (capacity / (window + 1)).
    bench/expertflow.py measures 0.36-0.42 per layer on its I/O-bound model, where path decoded at 1.26x LRU's tokens/s
    so (two layers ahead on 314 of its 322 predicting steps) against 1.20x reading one layer ahead
    (bench/results/expertflow_iobound_read_ahead.json), and 1.5-1.8 on the shipped model, where two layers ahead did
    not pay (0.90x against 0.92x, expertflow_default_lookahead.json).
    """

    def __init__(
        self,
        cache: ExpertCache,
        issue: Callable[[PrefetchPlan], int],
        *,
        layers: Sequence[int],
        lookahead: int = DEFAULT_LOOKAHEAD,
        width: int = 2,
        admission: AdmissionConfig | None = None,
        trial: PredictionTrial | None = None,
        read_ahead: int | None = None,
    ) -> None:
        if not isinstance(cache.policy, PredictivePolicy):
            raise MoeflowError("predictive prefetch needs the cache policy 'predictive'")
        if lookahead < 1:
            raise MoeflowError(f"lookahead must be at least 1 layer, got {lookahead}")
        if width < 1:
            raise MoeflowError(f"prefetch width must be at least 1 expert per token, got {width}")
        if read_ahead is not None and read_ahead < 0:
            raise MoeflowError(f"read-ahead must be >= 0 layers (0: chosen from the overlap), got {read_ahead}")
        self.cache = cache
        self.issue = issue
        self.layers = list(layers)
        self._pos_of = {layer: i for i, layer in enumerate(self.layers)}
        self.lookahead = lookahead
        self.read_ahead = read_ahead
        self.width = width
        self.admission = admission = admission or AdmissionConfig()
        self.calibration = Calibration(admission)
        self.ahead_calibration = Calibration(admission)  # `offer_next_step`'s predictions: another predictor
        self.estimate = None if admission.overlap is not None else OverlapEstimate(
            cache, layers=len(self.layers), lookahead=lookahead)
        # What one layer's compute hides, as given for `lookahead` layers (replay's), when it is not measured.
        self._fixed_per_layer = None if admission.overlap is None else admission.overlap / lookahead
        self._max_reads_per_token = admission.read_share * width * len(self.layers)
        self.counters = PrefetchCounters()
        self._used = (0.0, 0.0, 0)  # sums of overlap and contention at the start of decode steps that predicted, steps
        self.windows: dict[int, int] = {}  # window -> decode steps that predicted with it
        self.trial = trial
        self.predicting = True
        self._timing: tuple[float, int] | None = None  # (start, rows) of the decode step being timed
        # `offer_next_step`: the next step's first layer -> (its offers, the non-resident ones, the experts read
        # ahead), kept across the step's end until that layer's routing is known.
        self._ahead: dict[int, tuple[_Offers, set[int], list[int]]] = {}
        self._ahead_at: float | None = None  # when the reads ahead for the next step were issued
        self._ahead_lead: float | None = None  # seconds from then to that layer's routing, smoothed
        self._reset()
        self._set_window()  # `window` (layers read ahead), `overlap` (reads its compute hides), `_per_layer_cap`

    def _reset(self) -> None:
        self._pos = -1  # position of the layer that runs now; -1 before the first
        self._pending: dict[int, _Offers] = {}  # layer -> offered, not yet decided
        self._decided: dict[int, _Offers] = {}  # layer -> offered and decided, awaiting its routing
        self._candidates: dict[int, set[int]] = {}  # layer -> its offered experts that were not resident when decided
        self._issued: dict[int, list[int]] = {}  # layer -> experts read ahead (protected)
        self._current: list[ExpertKey] = []  # the running layer's experts, kept until the next layer
        self._reads = 0  # reads ahead issued this step
        self._tokens = 1  # tokens of this step (the most any offer had)

    @property
    def contention(self) -> float:
        """The share of a read ahead's cost that overlap never hides (admission's `contention`): the configured
        floor, or the share of the time the link is measured reading (`OverlapEstimate.busy`) if that is more."""
        busy = self.estimate.busy if self.estimate is not None else None
        floor = self.admission.contention
        return floor if busy is None else max(floor, busy)

    @property
    def mean_admission(self) -> tuple[float, float] | None:
        """(overlap, contention) as admission used them, averaged over the decode steps that predicted (None before
        the first), the overlap as `lookahead` layers' (the window's, scaled): what a replay of the run should assume
        (`moeflow.tools.profile.replay`, with the same `read_ahead`), since the engine measures
        both as it goes and admission is sensitive to them (bench/expertflow.py's I/O-bound decode replayed with the
        overlap 0.36 it ended at: hit rate 79.9%; with 0.5: 80.9%; live: 82.9%)."""
        overlap, contention, steps = self._used
        return (overlap / steps, contention / steps) if steps else None

    def fix_overlap(self, overlap: float) -> None:
        """Assume `overlap` (reads the lookahead's compute hides) instead of measuring it: what profiling
        replay does, which has no time to measure."""
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0 (reads hidden behind the lookahead's compute), got {overlap}")
        self.estimate = None
        self._fixed_per_layer = overlap / self.lookahead
        self._set_window()

    # ---- the step -------------------------------------------------------------------------------

    def begin_step(self, decode_rows: int = 0) -> None:
        """A forward begins; `decode_rows` > 0: it is a decode step of that many rows (the trial times those).
        The step before ends (`end_step`) in the same visit to the cache's lock as the policy's step begins."""
        self.counters.steps += 1
        if self.trial is not None:
            if self.trial.predicting != self.predicting:
                self.predicting = self.trial.predicting
                dormant = not self.predicting
                self.cache.advise(lambda policy, _: setattr(policy, "dormant", dormant))
            self._timing = (time.perf_counter(), decode_rows) if decode_rows > 0 else None
            if decode_rows == 0:
                self.trial.interrupt()
        if not self.predicting:
            self.counters.dormant_steps += 1
        if self._ahead and (decode_rows == 0 or not self.predicting):
            self._drop_ahead()  # read ahead for next tokens that this forward does not decode
        self._set_window()
        if self.predicting and decode_rows > 0:
            self.windows[self.window] = self.windows.get(self.window, 0) + 1
            overlap, contention, steps = self._used
            per_lookahead = self.overlap * self.lookahead / self.window
            self._used = (overlap + per_lookahead, contention + self.contention, steps + 1)
            if self.estimate is not None:
                self.estimate.begin()
        elif self.estimate is not None:
            self.estimate.interrupt()
        self._end_step(lambda policy: policy.begin_step())

    @property
    def per_layer(self) -> float:
        """Expert reads one layer's compute hides: measured (`OverlapEstimate.per_layer`) or fixed (replay's)."""
        return self.estimate.per_layer if self.estimate is not None else self._fixed_per_layer

    @property
    def reads_dear(self) -> bool:
        """Whether one layer's compute hides less than one expert's read (`per_layer` < 1): then reading further
        ahead pays, and only then: the wider window of `read_ahead` 0, and the next step's first layer
        (`offer_next_step`, which `moeflow.predictor.ahead` does not even work out otherwise)."""
        return self.per_layer < 1.0

    def _set_window(self) -> None:
        """This step's `window` (`read_ahead`), and what follows from it: the overlap and the slots per layer."""
        per_layer = self.per_layer
        ahead, window = self.read_ahead, self.lookahead
        if ahead == 0 and self.reads_dear:
            window += 1
        elif ahead:
            window = max(ahead, window)
        self.window = window
        self.overlap = window * per_layer
        # Slots one layer's reads ahead may take: the window holds window + 1 layers.
        self._per_layer_cap = max(1, self.cache.pool.capacity // (window + 1))

    def end_forward(self) -> None:
        """The forward `begin_step` began has returned: a timed decode step goes to the trial, a measured one to
        the overlap estimate."""
        if self.estimate is not None:
            self.estimate.end()
            self.overlap = self.window * self.estimate.per_layer
        if self._timing is not None and self.trial is not None:
            start, rows = self._timing
            self._timing = None
            self.trial.observe(time.perf_counter() - start, rows)

    def offer(
        self, layer: int, ranked_TM: Sequence[Sequence[int]], probs_TM: Sequence[Sequence[float]] | None = None
    ) -> None:
        """Predicted experts of `layer` for this step: one ranked list per token, best first, and for each the
        predictor's probability in [0, 1] that the token uses it (None: the predictor only ranks)."""
        self.offer_layers((layer,), (ranked_TM,), None if probs_TM is None else (probs_TM,))

    def offer_layers(
        self,
        layers: Sequence[int],
        ranked_LTM: Sequence[Sequence[Sequence[int]]],
        probs_LTM: Sequence[Sequence[Sequence[float]]] | None = None,
    ) -> None:
        """`offer` for several layers at once (a context predictor's answer for the whole step): one visit to the
        cache's lock for all of them."""
        if not self.predicting:
            return
        expected: dict[ExpertKey, float] = {}
        calibrated = self.calibration.table(self.width)  # the calibration does not change while offering
        pos_of, pending, decided, ran = self._pos_of, self._pending, self._decided, self._pos
        added = False
        for layer, ranked_TM, probs_TM in zip(layers, ranked_LTM, repeat(None) if probs_LTM is None else probs_LTM):
            pos = pos_of.get(layer)
            if pos is None or pos <= ran or layer in pending or layer in decided:
                continue  # not a layer of the prefetcher's, run already, or offered already
            pending[layer] = offers = self._offers(ranked_TM, probs_TM, calibrated)
            for e, p in zip(offers.experts, offers.ps):
                expected[layer, e] = p
            if len(ranked_TM) > self._tokens:
                self._tokens = len(ranked_TM)
            added = True
        if not added:
            return
        self._decide(self._due(), (lambda policy: policy.expect(expected)) if expected else None)

    def _offers(
        self, ranked_TM: Sequence[Sequence[int]], probs_TM: Sequence[Sequence[float]] | None, calibrated: list[float],
    ) -> _Offers:
        """One layer's offers from its tokens' ranked experts: each expert once, at its best rank, with the
        probability that some token uses it, calibrated (`calibrated`: `Calibration.table`)."""
        bin_of = self.calibration.bin_of
        if len(ranked_TM) == 1:  # one token (a decode step of batch 1): its ranks are its distinct experts
            experts = ranked_TM[0][: self.width]
            ranks = range(len(experts))
            if probs_TM is None:
                raws = [None] * len(experts)
            else:  # every bin in one call: the case every decode step of batch 1 pays for
                raws = probs_TM[0][: len(experts)]
                return _Offers(experts, raws, ranks, [calibrated[b] for b in self.calibration.bins_of(raws)])
        else:
            miss: dict[int, float] = {}  # expert -> probability that no token uses it
            rank_of: dict[int, int] = {}
            for rank in range(self.width):  # rank-major: every token's best guess before anyone's second
                for t, ranked in enumerate(ranked_TM):
                    if rank >= len(ranked):
                        continue
                    e = int(ranked[rank])
                    rank_of.setdefault(e, rank)
                    if probs_TM is not None:
                        miss[e] = miss.get(e, 1.0) * (1.0 - probs_TM[t][rank])
            experts, ranks = list(rank_of), list(rank_of.values())
            raws = [None] * len(experts) if probs_TM is None else [1.0 - miss[e] for e in experts]
        return _Offers(experts, raws, ranks, [calibrated[bin_of(raw, rank)] for raw, rank in zip(raws, ranks)])

    def offer_next_step(
        self, layer: int, ranked_TM: Sequence[Sequence[int]], probs_TM: Sequence[Sequence[float]]
    ) -> None:
        """Predicted experts of the *next* step's first layer `layer`, one ranked list per row of this decode step
        with the probability that the row's next token uses each, offered while this step's last layer runs.
        Admitted like any offer (its own calibration; the lead is about one layer's compute) and read once that
        last layer's experts are all in (`ExpertCache.when_layer_read`: they never delay its demand reads); the
        reads stay protected across the step's end until `layer`'s routing is known, then are scored, released,
        and the wrong ones demoted or dropped, as reads ahead are."""
        if not self.predicting or layer in self._ahead or not ranked_TM:
            return
        offers = self._offers(ranked_TM, probs_TM, self.ahead_calibration.table(self.width))
        self.counters.ahead_offered += len(offers.experts)
        max_reads = min(self._per_layer_cap, self.width * len(ranked_TM))
        chosen, candidates = self.cache.advise(partial(
            self._admit, layer=layer, offers=offers, max_reads=max_reads, first=None, overlap=self._ahead_overlap()))
        self._ahead[layer] = record = (offers, set(candidates), [e for _, e in chosen])
        if chosen:
            plan = PrefetchPlan(keys=tuple(chosen))
            self.cache.when_layer_read(lambda: self._issue_ahead(layer, record, plan))

    def _ahead_overlap(self) -> float:
        """Reads that the lead of a read ahead for the next step hides: the measured time from its issue to its
        layer's routing over a demand read's stall; until both are measured (or where nothing is: replay), the
        overlap per layer."""
        read_s = self.estimate.read_s if self.estimate is not None else None
        if read_s is None or self._ahead_lead is None:
            return self.overlap / self.window
        return self._ahead_lead / read_s

    def _issue_ahead(self, layer: int, record: tuple, plan: PrefetchPlan) -> None:
        if self._ahead.get(layer) is not record:  # dropped before the last layer acquired (its forward failed)
            return
        self._ahead_at = time.perf_counter()
        self.counters.ahead_issued += self.issue(plan)

    def _drop_ahead(self) -> None:
        """Forget the next step's reads ahead: released, and dropped if still queued."""
        keys = [(layer, e) for layer, (_, _, issued) in self._ahead.items() for e in issued]
        self._ahead.clear()
        self._ahead_at = None
        if keys:
            self.cache.advise(lambda policy, _: policy.release(keys))
            self.counters.cancelled += self.cache.cancel_queued(keys)

    def on_routing(self, layer: int, expert_ids: Iterable[int]) -> None:
        """`layer`'s real experts are known: score and correct its predictions, move the window on."""
        if not self.predicting:
            return
        used = set(expert_ids)
        counters = self.counters
        counters.used += len(used)
        offers = self._decided.pop(layer, None)
        if offers is None:  # offered too late to decide (or not at all); still counts for accuracy
            offers = self._pending.pop(layer, None)
        candidates = self._candidates.pop(layer, None)
        predicted: list[ExpertKey] = []
        if offers is not None:
            experts = offers.experts
            # Calibrated on the candidates only: a prediction of an expert that is not resident (what admission
            # asks about) is right less often than one of an expert the layer used a moment ago.
            if candidates:
                observe, raws, ranks = self.calibration.observe, offers.raws, offers.ranks
                for i, e in enumerate(experts):
                    if e in candidates:
                        observe(raws[i], e in used, ranks[i])
            predicted = [(layer, e) for e in experts]  # one offer per expert
            counters.offered += len(experts)
            counters.correct += len(used.intersection(experts))
        issued = self._issued.pop(layer, None)
        ahead = self._ahead.pop(layer, None)
        if ahead is not None:  # the previous step's reads ahead for this layer (`offer_next_step`)
            offers_ahead, candidates_ahead, issued_ahead = ahead
            observe = self.ahead_calibration.observe
            for e, raw, rank in zip(offers_ahead.experts, offers_ahead.raws, offers_ahead.ranks):
                if e in candidates_ahead:
                    observe(raw, e in used, rank)
            counters.ahead_correct += len(used.intersection(issued_ahead))
            if self._ahead_at is not None:
                lead = time.perf_counter() - self._ahead_at
                self._ahead_lead = lead if self._ahead_lead is None else 0.7 * self._ahead_lead + 0.3 * lead
                self._ahead_at = None
            issued = [*(issued or ()), *issued_ahead]
        issued_keys = [(layer, e) for e in issued] if issued else []
        wrong = [(layer, e) for e in issued if e not in used] if issued else []
        previous = self._current
        self._current = current = [(layer, e) for e in used]
        self._pos = self._pos_of.get(layer, self._pos)

        def correct(policy: PredictivePolicy) -> None:
            policy.layer_ran(previous, issued_keys, predicted, wrong, current)

        if wrong:
            self.cache.advise(lambda policy, _: correct(policy))
            # wrong reads ahead not yet started are dropped (demoted above if they landed)
            counters.cancelled += self.cache.cancel_queued(wrong)
            self._decide(self._due())
        else:  # the correction and the next layer's admission in one visit to the cache's lock
            self._decide(self._due(), correct)

    def end_step(self) -> None:
        """Release everything this step protected, the next step's reads ahead too; reads ahead never used are
        dropped if still queued."""
        self._end_step(None)
        self._drop_ahead()

    def _end_step(self, then: Callable[[PredictivePolicy], None] | None) -> None:
        """`end_step`, with `then(policy)` in the same visit to the cache's lock (there is always one if given)."""
        keys = [(layer, e) for layer, experts in self._issued.items() for e in experts]
        current = self._current
        if keys or current or then is not None:

            def release(policy: PredictivePolicy, _: int) -> None:
                policy.release(current)
                policy.release(keys)
                if then is not None:
                    then(policy)

            self.cache.advise(release)
        if keys:
            self.counters.cancelled += self.cache.cancel_queued(keys)
        self._reset()

    # ---- issuing --------------------------------------------------------------------------------

    def _due(self) -> list[int]:
        """The offered layers now within `window` of the running one and not yet run, most urgent first."""
        pending, layers = self._pending, self.layers
        if not pending:
            return []
        return [layers[pos] for pos in range(self._pos + 1, min(self._pos + self.window, len(layers) - 1) + 1)
                if layers[pos] in pending]  # fmt: skip

    def _max_reads(self) -> int:
        return min(self._per_layer_cap, int(self._max_reads_per_token * self._tokens) - self._reads)

    def _decide(self, layers: Sequence[int], first: Callable[[PredictivePolicy], None] | None = None) -> None:
        """Admit and issue the reads ahead of `layers` (due, in order), one visit to the cache's lock each;
        `first(policy)` runs in the first visit (alone if no layer is due)."""
        if not layers and first is not None:
            self.cache.advise(lambda policy, _: first(policy))
        for layer in layers:
            offers = self._pending.pop(layer)
            self._issue(layer, offers, self.cache.advise(
                partial(self._admit, layer=layer, offers=offers, max_reads=self._max_reads(), first=first)))
            first = None

    def _issue(self, layer: int, offers: _Offers, admitted: tuple[list[ExpertKey], list[int]]) -> None:
        """`layer`'s offers are decided: `admitted` = (the reads ahead chosen, the non-resident offered experts)."""
        chosen, candidates = admitted
        self._decided[layer] = offers
        self._candidates[layer] = set(candidates)
        self.counters.refused += len(candidates) - len(chosen)
        self._issued[layer] = [e for _, e in chosen]
        if chosen:
            issued = self.issue(PrefetchPlan(keys=tuple(chosen)))
            self._reads += issued
            self.counters.issued += issued

    def _admit(
        self, policy: PredictivePolicy, free: int, *, layer: int, offers: _Offers, max_reads: int,
        first: Callable[[PredictivePolicy], None] | None, overlap: float | None = None,
    ) -> tuple[list[ExpertKey], list[int]]:
        """Under the cache's lock (after `first(policy)`, if given): the non-resident predicted experts of `layer`
        worth reading ahead (protected), and all the non-resident ones."""
        if first is not None:
            first(policy)
        resident = policy.resident
        candidates = [((layer, e), p) for e, p in zip(offers.experts, offers.ps) if not resident((layer, e))]
        if not candidates or max_reads <= 0 or policy.by_recency:
            # by_recency: the routing has lately been less predictable than plain recency; read nothing ahead.
            return [], [k[1] for k, _ in candidates]
        chosen = admit(candidates, free_slots=free, victims=_victims(policy, max_reads),
                       overlap=self.overlap if overlap is None else overlap,
                       contention=self.contention, max_reads=max_reads)
        policy.protect(chosen)
        return chosen, [k[1] for k, _ in candidates]


def _victims(policy: PredictivePolicy, n: int) -> Iterator[float]:
    """`policy.eviction_worths(n)`, worked out only if admission runs out of free slots (a scan of every resident
    expert: the reads ahead into free slots, while the cache fills, need none)."""
    yield from policy.eviction_worths(n)
