"""Prefetch admission by expected cost: the decision, its online estimates, and the prefetcher that uses them.

Deterministic scenarios on the real `ExpertCache` over a meta-device pool and a store that moves nothing.
"""

import copy
import random

import pytest
import torch

from moeflow.errors import MoeflowError
from moeflow.offload.admission import AdmissionConfig, Calibration, NextUse, PredictionTrial, admit, net_gain
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import serve_layer
from moeflow.offload.plans import RoutingPlan
from moeflow.offload.policy import LRUPolicy, PredictivePolicy
from moeflow.offload.prefetch import OverlapEstimate, PredictivePrefetcher
from moeflow.offload.transfer import TransferEngine

A, B, C, D, E = ((1, e) for e in range(5))


def decide(candidates, *, free=0, victims=(), overlap=1.0, contention=0.25, max_reads=8):
    return admit(candidates, free_slots=free, victims=victims, overlap=overlap, contention=contention,
                 max_reads=max_reads)


# ---- the decision ---------------------------------------------------------------------------------------


def test_a_confident_prediction_is_admitted_over_a_cold_victim():
    assert decide([(A, 0.95)], victims=[0.05]) == [A]


def test_a_low_confidence_prediction_that_would_evict_a_hot_expert_is_refused():
    assert decide([(A, 0.3)], victims=[0.9]) == []
    assert decide([(A, 0.3)], free=1) == [A]  # the same guess with a free slot costs only its read


def test_the_most_likely_go_first_and_each_takes_the_next_victim():
    # A pays against the cold victim; B (less likely) would displace the hot one and does not.
    assert decide([(B, 0.4), (A, 0.9)], victims=[0.0, 0.95], overlap=4.0) == [A]


def test_an_io_bound_link_admits_only_near_certain_predictions():
    # overlap 0.1: a read ahead hides a tenth of itself, a wasted one costs 0.9 of a read.
    assert decide([(A, 0.8)], free=1, overlap=0.1) == []
    assert decide([(A, 0.95)], free=1, overlap=0.1) == [A]


def test_one_layers_reads_share_its_window_of_compute():
    # overlap 1: the first read ahead hides all of itself, the second nothing (it waits behind the first).
    assert decide([(A, 0.9), (B, 0.9)], free=2, overlap=1.0) == [A]
    assert decide([(A, 0.9), (B, 0.9)], free=2, overlap=2.0) == [A, B]


def test_the_read_cap_binds():
    sure = [((1, e), 0.99) for e in range(6)]
    assert len(decide(sure, free=6, overlap=8.0, max_reads=2)) == 2
    assert decide(sure, free=6, overlap=8.0, max_reads=0) == []


def test_nothing_left_to_evict_admits_nothing():
    assert decide([(A, 0.99)], victims=[]) == []


def test_contention_keeps_even_hidden_reads_from_being_free():
    assert net_gain(0.1, 0.0, 1.0, 0.0) > 0  # a free read of a 10% guess would pay...
    assert net_gain(0.1, 0.0, 1.0, 0.25) < 0  # ...but a read takes the link and cores from others


@pytest.mark.parametrize("bad", [dict(overlap=-1.0), dict(read_share=-0.1), dict(contention=1.5), dict(bins=0)])
def test_bad_admission_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AdmissionConfig(**bad)


# ---- online estimates -----------------------------------------------------------------------------------


def test_calibration_believes_the_predictor_until_outcomes_say_otherwise():
    cal = Calibration(AdmissionConfig())
    assert cal.probability(0.9) == pytest.approx(0.95)  # an empty bin: its raw probability
    for _ in range(40):
        cal.observe(0.9, used=False)
    assert cal.probability(0.9) < 0.15
    assert cal.probability(0.3) == pytest.approx(0.35)  # other bins keep their own evidence
    for _ in range(2000):  # old outcomes fade: a predictor that became right is believed again
        cal.observe(0.9, used=True)
    assert cal.probability(0.9) > 0.9


def test_calibration_weighs_each_outcome_by_its_age_across_the_rescale():
    # decay 0.5 per outcome: the scale underflows past 1e-200 after ~665 outcomes and is folded back.
    config = AdmissionConfig(half_life=1.0, prior_weight=1.0)
    cal = Calibration(config)
    outcomes = [(n * 7) % 3 == 0 for n in range(1500)]
    for used in outcomes:
        cal.observe(0.55, used)
    weights = [0.5 ** age for age in range(len(outcomes))]  # the newest outcome weighs 1
    hits = sum(w for w, used in zip(weights, reversed(outcomes)) if used)
    want = (hits + config.prior_weight * 0.55) / (sum(weights) + config.prior_weight)
    assert cal.probability(0.55) == pytest.approx(want, rel=1e-9)


def test_rank_only_predictions_are_calibrated_per_rank():
    cal = Calibration(AdmissionConfig())
    for _ in range(50):
        cal.observe(None, used=True, rank=0)
        cal.observe(None, used=False, rank=1)
    assert cal.probability(None, rank=0) > 0.9 and cal.probability(None, rank=1) < 0.1


def test_the_calibration_table_is_each_bins_probability_rank_bins_included():
    # `table` is what an offer reads (indexed by `bins_of` at batch 1); it must agree with `probability` bin by bin,
    # for rank-only bins never observed and after outcomes in probability and rank bins.
    cal = Calibration(AdmissionConfig())
    for n in range(300):
        cal.observe((n % 10) / 10 + 0.05, used=n % 3 == 0)
        cal.observe(None, used=n % 2 == 0, rank=n % 3)
    table = cal.table(5)
    assert len(table) == cal.bins + 5
    want = [cal.probability(raw) for raw in (b / 10 + 0.05 for b in range(10))]
    want += [cal.probability(None, rank=r) for r in range(5)]
    assert table == want
    assert table[cal.bins + 4] == pytest.approx(1 / 6)  # rank 4: never seen, its prior
    assert cal.table(1) == want[: cal.bins + 1]
    raws = [0.0, -0.1, 1e-9, 0.1, 0.0999999, 0.55, 0.9, 0.99999, 1.0, 1.5]
    assert cal.bins_of(raws) == [0, 0, 0, 1, 0, 5, 9, 9, 9, 9]  # tenths, the top one closed, nothing below 0


def test_next_use_learns_what_follows_what():
    nu = NextUse(half_life=8.0, markov_weight=0.5)
    for step in range(1, 101):  # layer 1 alternates between experts {0, 1} and {2, 3}
        for e in ((0, 1) if step % 2 else (2, 3)):
            nu.on_use((1, e), step)
    # The latest step (100) used {2, 3}: the next uses {0, 1}.
    assert nu.probability((1, 0)) > 0.7 > 0.3 > nu.probability((1, 2))
    assert nu.probability((2, 0)) == 0.0  # a layer never seen


def test_next_use_ranks_a_passages_hot_experts_above_cold_ones():
    nu = NextUse(half_life=8.0, markov_weight=0.5)
    for step in range(1, 61):  # expert 0 every step, expert 1+k a few times long ago, expert 9 once just now
        nu.on_use((0, 0), step)
        nu.on_use((0, 1 + step % 3 if step < 20 else 9 if step == 60 else 5), step)
    assert nu.probability((0, 0)) > nu.probability((0, 5)) > nu.probability((0, 2))
    assert 0.0 <= nu.probability((0, 9)) <= 1.0


def test_next_use_answers_from_its_memo_what_it_would_work_out_afresh():
    # Scans ask the same keys many times a token; the memo must forget a layer's answers at each use in that layer
    # and everything at a new step, or an eviction would be chosen on stale probabilities.
    rng = random.Random(0)
    nu = NextUse(half_life=8.0)
    keys = [(layer, e) for layer in range(3) for e in range(10)]
    step = 0
    for _ in range(3000):
        r = rng.random()
        if r < 0.1:
            step += 1
        elif r < 0.5:
            nu.on_use((rng.randrange(3), rng.randrange(12)), step)  # experts past the queried ones grow the tables
        else:
            asked = rng.sample(keys, 5)
            fresh = copy.deepcopy(nu)
            fresh._memo.clear()
            assert nu.probabilities(asked) == [fresh.probability(k) for k in asked]


def test_bad_next_use_settings_are_refused():
    with pytest.raises(ValueError):
        NextUse(markov_weight=1.5)
    with pytest.raises(ValueError):
        NextUse(half_life=0)


# ---- the policy -----------------------------------------------------------------------------------------


def test_predictive_policy_evicts_the_expert_worth_least():
    p = PredictivePolicy()
    for key in (A, B, C):
        p.on_insert(key)
        p.on_access(key)
    assert p.victim([A, B, C]) == A  # equal worth: least recently used
    p.expect({A: 0.9})
    assert p.victim([A, B, C]) == B  # A is expected by an upcoming layer
    p.demote([C])
    assert p.victim([A, B, C]) == C  # a wrong prediction is worth nothing
    p.protect([C])
    assert p.victim([A, B, C]) == B  # protected go last
    assert p.victim([C]) == C  # ...unless nothing else can go
    p.forget([A])
    assert p.eviction_worths(5) == sorted(p.worth(k) for k in (A, B))
    assert p.eviction_worths(1) == [min(p.worth(k) for k in (A, B))]


def _serve(cache, stream):
    """One expert of layer 0 per decode step; the misses it cost."""
    before = cache.stats().misses
    for e in stream:
        if isinstance(cache.policy, PredictivePolicy):
            cache.policy.begin_step()
        serve_layer(cache, RoutingPlan(layer=0, expert_ids=(e,), num_tokens=1))
    return cache.stats().misses - before


def test_predictive_policy_keeps_a_passages_hot_experts_through_a_scan():
    stream = [e for k in range(60) for e in (0, 1, 10 + 2 * k, 11 + 2 * k)]  # two hot experts, a scan of cold ones
    predictive, lru = _cache(PredictivePolicy(), slots=3, layers=(0,)), _cache(LRUPolicy(), slots=3, layers=(0,))
    assert _serve(predictive, stream) < 0.8 * _serve(lru, stream)  # LRU evicts a hot one at every second cold one
    assert not predictive.policy.by_recency


def test_predictive_policy_evicts_as_lru_while_recency_misses_less():
    # Long passages, each cycling over three experts of its own: what was hot a moment ago is no guide,
    # recency is (three slots hold the passage). Each new passage costs LRU three misses; the estimate
    # keeps the old passage's experts a while and misses more, so the policy turns to recency.
    stream = [10 * p + i % 3 for p in range(12) for i in range(30)]
    predictive, lru = _cache(PredictivePolicy(), slots=3, layers=(0,)), _cache(LRUPolicy(), slots=3, layers=(0,))
    misses, lru_misses = _serve(predictive, stream), _serve(lru, stream)
    assert predictive.policy.by_recency
    assert misses <= lru_misses + 12  # a few passages to notice, then as LRU
    tail = [10 * 20 + i % 3 for i in range(30)]
    assert _serve(predictive, tail) == _serve(lru, tail) == 3


# ---- the prefetcher on a real cache ---------------------------------------------------------------------


class _NullStore:
    direct_io = False

    def read_into(self, key, gate_up, down):
        return 1

    def close(self):
        pass


def _cache(policy, slots=4, layers=(0, 1)):
    pool = SlotPool(capacity=slots, inter=2, hidden=2, dtype=torch.float32, device=torch.device("meta"))
    return ExpertCache(pool=pool, store=_NullStore(), policy=policy, layers=list(layers), budget_bytes=slots * 48)


def _prefetcher(cache, **admission):
    return PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1], lookahead=1,
                                width=2, admission=AdmissionConfig(**admission))


def _step(prefetcher, cache, routing, offers):
    """One decode step: offers [(layer, experts, probs)] at its start, then every layer's routing."""
    prefetcher.begin_step()
    for layer, experts, probs in offers:
        prefetcher.offer(layer, [experts], None if probs is None else [probs])
    for layer, used in enumerate(routing):
        prefetcher.on_routing(layer, used)
        serve_layer(cache, RoutingPlan(layer=layer, expert_ids=tuple(used), num_tokens=1))


def test_a_right_confident_prediction_is_read_ahead_and_hit():
    cache = _cache(PredictivePolicy())
    pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
    _step(pf, cache, [(0, 1), (2, 3)], [(0, [0, 1], [0.99, 0.99]), (1, [2, 3], [0.99, 0.99])])
    s = cache.stats()
    assert pf.counters.issued == 4 and s.prefetch_hits == 4 and s.misses == 0


def test_rank_only_offers_are_read_ahead_by_their_ranks_prior_for_one_token_or_several():
    # Without probabilities an offer is calibrated per rank (rank 0 believed at 1/2, rank 1 at 1/3): with the
    # overlap hiding every read and free slots, both pay. One token (its ranks are its experts) and two tokens
    # (each expert at its best rank) must decide alike.
    for tokens in (1, 2):
        cache = _cache(PredictivePolicy())
        pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
        pf.begin_step()
        pf.offer_layers([0, 1], [[[0, 1]] * tokens, [[2, 3]] * tokens])
        assert pf.counters.issued == 2, tokens  # the first layer's, due at once (lookahead 1)
        for layer, used in enumerate([(0, 1), (2, 3)]):
            pf.on_routing(layer, used)
            serve_layer(cache, RoutingPlan(layer=layer, expert_ids=used, num_tokens=tokens))
        assert pf.counters.issued == 4 and pf.counters.refused == 0
        assert cache.stats().prefetch_hits == 4 and pf.counters.correct == 4
        # the right guesses raised each rank's own bin (rank 1's from its prior 1/3)
        assert pf.calibration.probability(None, rank=0) > 0.5 and pf.calibration.probability(None, rank=1) > 1 / 3


def test_reads_ahead_into_free_slots_price_no_victim():
    # Admission scans the resident experts for victims' worths only once the free slots run out: a cache that is
    # still filling never pays for the scan.
    class Counted(PredictivePolicy):
        scans = 0

        def eviction_worths(self, n: int) -> list[float]:
            Counted.scans += 1
            return super().eviction_worths(n)

    cache = _cache(Counted())
    pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
    _step(pf, cache, [(0, 1), (2, 3)], [(0, [0, 1], [0.99, 0.99]), (1, [2, 3], [0.99, 0.99])])
    assert pf.counters.issued == 4 and Counted.scans == 0
    _step(pf, cache, [(4, 5), (6, 7)], [(0, [4, 5], [0.99, 0.99]), (1, [6, 7], [0.99, 0.99])])
    assert Counted.scans > 0  # the cache is full: the next step's reads ahead need victims


def test_after_a_run_of_wrong_predictions_admission_closes_and_the_cache_is_lru():
    routing = [[(0, 1), (2, 3)], [(4, 5), (6, 7)], [(0, 1), (6, 7)]]
    liar = [(0, [6, 7], [0.95, 0.95]), (1, [0, 1], [0.95, 0.95])]  # confident, and never right
    cache, lru = _cache(PredictivePolicy()), _cache(LRUPolicy())
    pf = _prefetcher(cache, overlap=4.0)
    for n in range(300):
        if n == 200:
            issued, misses, lru_misses = pf.counters.issued, cache.stats().misses, lru.stats().misses
        _step(pf, cache, routing[n % 3], liar)
        for layer, used in enumerate(routing[n % 3]):
            serve_layer(lru, RoutingPlan(layer=layer, expert_ids=used, num_tokens=1))
    assert issued > 0  # it was believed at first
    assert pf.counters.issued == issued  # and not any more
    assert cache.stats().misses - misses <= lru.stats().misses - lru_misses  # no more misses than LRU


def test_the_byte_cap_binds_per_token():
    cache = _cache(PredictivePolicy(), slots=8)
    pf = _prefetcher(cache, overlap=8.0, read_share=0.25)  # width 2 x 2 layers x 0.25: one read per token
    _step(pf, cache, [(0, 1), (2, 3)], [(0, [0, 1], [0.99, 0.99]), (1, [2, 3], [0.99, 0.99])])
    assert pf.counters.issued == 1 and pf.counters.refused == 3


def test_layers_offered_together_are_all_expected_before_the_first_read_ahead_is_decided():
    # Resident, oldest use first: layer 1's {4, 5}, then layer 0's {2, 3}. This step predicts layer 0 -> {0, 1},
    # layer 1 -> {4, 5}. Layer 0's reads ahead are decided at once and need two victims.
    kept = {}
    for together in (False, True):
        cache = _cache(PredictivePolicy())
        pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
        serve_layer(cache, RoutingPlan(layer=1, expert_ids=(4, 5), num_tokens=1))
        serve_layer(cache, RoutingPlan(layer=0, expert_ids=(2, 3), num_tokens=1))
        pf.begin_step()
        if together:
            pf.offer_layers([0, 1], [[[0, 1]], [[4, 5]]], [[[0.99, 0.99]], [[0.99, 0.99]]])
        else:
            pf.offer(0, [[0, 1]], [[0.99, 0.99]])
            pf.offer(1, [[4, 5]], [[0.99, 0.99]])
        kept[together] = {e for e in (4, 5) if cache.policy.resident((1, e))}
        assert pf.counters.issued == 2
    assert kept[True] == {4, 5}  # layer 1's expected experts are not the victims: layer 0's old ones are
    assert kept[False] != {4, 5}  # one by one, layer 0 decides before layer 1's expectations are known


def test_a_wrong_admitted_read_is_demoted_and_released():
    cache = _cache(PredictivePolicy())
    pf = _prefetcher(cache, overlap=4.0)
    pf.begin_step()
    pf.offer(0, [[0, 3]], [[0.99, 0.99]])
    assert pf.counters.issued == 2 and cache.policy.protected == {(0, 0), (0, 3)}
    pf.on_routing(0, [0, 1])
    assert (0, 3) not in cache.policy.protected and cache.policy.worth((0, 3)) == 0.0  # the next victim
    pf.end_step()
    assert cache.policy.protected == frozenset()


def _last_layer_with_next_step_offer(pf, cache, routing, ahead):
    """A decode step (one row) whose last layer offers `ahead` (experts, probs) for the next step's first layer."""
    pf.begin_step(1)
    pf.on_routing(0, routing[0])
    serve_layer(cache, RoutingPlan(layer=0, expert_ids=routing[0], num_tokens=1))
    pf.on_routing(1, routing[1])
    pf.offer_next_step(0, [ahead[0]], [ahead[1]])


def test_the_next_steps_first_layer_is_read_once_the_last_layers_experts_are_in_and_hits():
    cache = _cache(PredictivePolicy(), slots=6)
    pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
    _last_layer_with_next_step_offer(pf, cache, [(0, 1), (2, 3)], ([4, 5], [0.99, 0.99]))
    assert pf.counters.ahead_issued == 0  # not before the last layer's own (demand) reads
    assert {(0, 4), (0, 5)} <= cache.policy.protected
    serve_layer(cache, RoutingPlan(layer=1, expert_ids=(2, 3), num_tokens=1))
    assert pf.counters.ahead_issued == 2 and cache.policy.resident((0, 4)) and cache.policy.resident((0, 5))
    pf.begin_step(1)  # the next decode step: the reads stay protected until the first layer's routing
    assert {(0, 4), (0, 5)} <= cache.policy.protected
    hits = cache.stats().prefetch_hits
    pf.on_routing(0, (4, 5))
    serve_layer(cache, RoutingPlan(layer=0, expert_ids=(4, 5), num_tokens=1))
    assert cache.stats().prefetch_hits - hits == 2 and pf.counters.ahead_correct == 2
    pf.on_routing(1, (2, 3))  # protected as the running layer's experts until the next layer's routing
    assert not {(0, 4), (0, 5)} & cache.policy.protected


def test_a_wrong_read_for_the_next_step_is_demoted_and_one_the_next_forward_cannot_use_is_dropped():
    cache = _cache(PredictivePolicy(), slots=6)
    pf = _prefetcher(cache, overlap=4.0, read_share=1.0)
    _last_layer_with_next_step_offer(pf, cache, [(0, 1), (2, 3)], ([4, 5], [0.99, 0.99]))
    serve_layer(cache, RoutingPlan(layer=1, expert_ids=(2, 3), num_tokens=1))
    pf.begin_step(1)
    pf.on_routing(0, (4, 1))
    assert pf.counters.ahead_correct == 1
    assert (0, 5) not in cache.policy.protected and cache.policy.worth((0, 5)) == 0.0  # the next victim
    # offered, then the next forward is not a decode step (a prefill): the reads ahead are released
    _last_layer_with_next_step_offer(pf, cache, [(4, 1), (2, 3)], ([6, 7], [0.99, 0.99]))
    assert {(0, 6), (0, 7)} <= cache.policy.protected
    pf.begin_step(0)
    assert not {(0, 6), (0, 7)} & cache.policy.protected
    pf.on_routing(0, (6, 7))
    assert pf.counters.ahead_correct == 1  # nothing was carried to be scored


def test_next_step_predictions_are_admitted_by_their_own_calibration():
    cache = _cache(PredictivePolicy(), slots=6)
    pf = _prefetcher(cache, overlap=1.0, read_share=1.0)
    routing = [(0, 1), (2, 3)]
    for n in range(80):  # confident next-step predictions that are never right
        if n == 40:
            issued = pf.counters.ahead_issued
        _last_layer_with_next_step_offer(pf, cache, routing, ([4, 5], [0.95, 0.95]))
        serve_layer(cache, RoutingPlan(layer=1, expert_ids=routing[1], num_tokens=1))
    assert issued > 0 and pf.counters.ahead_correct == 0  # believed at first
    assert pf.counters.ahead_issued == issued  # and not any more
    # their outcomes go to their own calibration, not to the one of the layers' own predictions
    assert pf.ahead_calibration.probability(0.95) < 0.6 < 0.9 < pf.calibration.probability(0.95)


def test_when_layer_read_runs_once_after_the_layers_reads_land():
    cache = _cache(LRUPolicy())
    seen = []
    cache.when_layer_read(lambda: seen.append(sorted(cache.resident())))
    serve_layer(cache, RoutingPlan(layer=0, expert_ids=(0, 1), num_tokens=1))
    serve_layer(cache, RoutingPlan(layer=1, expert_ids=(2,), num_tokens=1))
    assert seen == [[(0, 0), (0, 1)]]


# ---- the wall-clock trial -------------------------------------------------------------------------------


def _run_trial(trial, seconds_per_row, steps, rows=1):
    """Feed `steps` decode steps timed by `seconds_per_row(predicting, step)`; the mode of each step."""
    modes = []
    for n in range(steps):
        modes.append(trial.predicting)
        trial.observe(seconds_per_row(trial.predicting, n) * rows, rows)
    return modes


def test_the_trial_stops_predicting_where_prediction_costs_time_and_tries_again_ever_more_rarely():
    trial = PredictionTrial()
    modes = _run_trial(trial, lambda predicting, _: 0.013 if predicting else 0.010, 2000)
    assert not trial.best and trial.switches == 1
    first = trial.settle + trial.first_gap  # predicting until the first trial of the other mode
    assert all(modes[:first]) and not any(modes[first:first + trial.settle + trial.window])
    later = modes[1000:]
    assert sum(later) / len(later) < 0.02  # the losing mode's trials have become rare
    assert trial.seconds_per_row[True] > trial.seconds_per_row[False]


def test_the_trial_keeps_predicting_where_it_pays():
    trial = PredictionTrial()
    modes = _run_trial(trial, lambda predicting, _: 0.050 if predicting else 0.070, 2000, rows=8)
    assert trial.best and trial.switches == 0
    assert sum(modes) / len(modes) > 0.97


def test_the_trial_follows_a_change_of_regime():
    trial = PredictionTrial()
    # Prediction pays for the first 600 steps (an I/O-bound passage), then costs (everything is resident).
    modes = _run_trial(trial, lambda predicting, n: (0.05 if predicting else 0.07) if n < 600 else
                       (0.012 if predicting else 0.010), 1400)
    assert trial.best is False and not any(modes[-100:])
    assert sum(modes[:600]) > 550


def test_a_difference_within_the_margin_changes_nothing():
    trial = PredictionTrial(margin=0.05)
    _run_trial(trial, lambda predicting, _: 0.0100 if predicting else 0.0097, 500)
    assert trial.best and trial.switches == 0 and trial.trials > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_steps_still_find_a_clear_difference(seed):
    # The shipped model at 25%: prediction's bookkeeping costs ~30% per step, step times vary ~15%.
    rng = random.Random(seed)
    trial = PredictionTrial()
    modes = _run_trial(trial, lambda predicting, _: (0.013 if predicting else 0.010) * rng.uniform(0.85, 1.15), 2000)
    assert not trial.best and sum(modes) / len(modes) < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_larger_than_a_gain_leaves_prediction_on(seed):
    # An I/O-bound model: prediction saves ~12%, but each step's time depends on the misses it meets (+-50%).
    rng = random.Random(seed)
    trial = PredictionTrial()
    modes = _run_trial(trial, lambda predicting, _: (0.080 if predicting else 0.090) * rng.uniform(0.5, 1.5), 2000)
    assert trial.best and sum(modes) / len(modes) > 0.95


def test_settle_steps_after_a_switch_are_not_measured():
    trial = PredictionTrial(window=2, settle=3, first_gap=2)
    # Right after each switch the step is slow whatever the mode (the cache changing hands): not counted.
    seen = []

    def seconds(predicting, n):
        fresh = len(seen) == 0 or seen[-1] != predicting
        seen.append(predicting)
        return 1.0 if fresh else (0.02 if predicting else 0.01)

    _run_trial(trial, seconds, 200)
    assert trial.seconds_per_row == pytest.approx({True: 0.02, False: 0.01}) and not trial.best


def test_decode_steps_right_after_a_prefill_are_not_measured():
    # Random routing: both modes cost the same, but the first two decode steps after each prefill (every 64 steps) are
    # 4x and 2x slower; measured, they count against whichever mode runs then.
    def run(interrupt):
        trial = PredictionTrial()

        def seconds(predicting, n):
            if n % 64 == 0 and interrupt:
                trial.interrupt()
            return 0.04 * (4.0 if n % 64 == 0 else 2.0 if n % 64 == 1 else 1.0)

        _run_trial(trial, seconds, 64 * 6)
        return trial

    trial = run(interrupt=False)
    assert trial.seconds_per_row[True] > 1.1 * trial.seconds_per_row[False]  # the heads of the prompts counted
    trial = run(interrupt=True)
    assert trial.seconds_per_row[True] == pytest.approx(trial.seconds_per_row[False])
    assert trial.switches == 0 and trial.best


@pytest.mark.parametrize("seed", range(8))
def test_lru_trials_are_not_judged_on_the_experts_the_predictor_left_resident(seed):
    # I/O-bound: prediction saves ~11% (+-50% per step). The first 3 steps of plain LRU after predicting run on the
    # experts the predictor read ahead and are faster than either mode's steady state. Measured from the second
    # step on (settle=1), that head start won the trials of three of these eight runs and turned prediction off.
    rng = random.Random(seed)
    trial = PredictionTrial()
    since_switch = [0, None]  # steps in the current mode, the mode

    def seconds(predicting, _):
        since_switch[0] = since_switch[0] + 1 if since_switch[1] == predicting else 0
        since_switch[1] = predicting
        steady = 0.080 if predicting else 0.090
        inherited = not predicting and since_switch[0] < 3
        return (0.060 if inherited else steady) * rng.uniform(0.5, 1.5)

    modes = _run_trial(trial, seconds, 2000)
    assert trial.best and sum(modes) / len(modes) > 0.9


@pytest.mark.parametrize("bad", [dict(window=1), dict(window=8, max_window=4), dict(max_window=40), dict(settle=-1),
                                 dict(z=-1.0), dict(margin=1.0), dict(first_gap=0), dict(max_gap=4, first_gap=8),
                                 dict(growth=0), dict(after_prefill=-1)])
def test_bad_trial_settings_are_refused(bad):
    with pytest.raises(ValueError):
        PredictionTrial(**bad)


def test_a_dormant_prefetcher_neither_predicts_nor_reads_ahead_and_its_policy_is_lru():
    cache = _cache(PredictivePolicy())
    trial = PredictionTrial(window=2, settle=0, first_gap=1)
    pf = PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1], lookahead=1,
                              width=2, admission=AdmissionConfig(overlap=4.0), trial=trial)
    for _ in range(trial.window):
        pf.begin_step(decode_rows=1)
        assert pf.predicting and not cache.policy.dormant
        pf.end_forward()
    assert not trial.predicting  # two predicting steps measured: the trial tries the other mode next
    routing = [(0, 1), (2, 3)]
    offers = [(0, [0, 1], [0.99, 0.99]), (1, [2, 3], [0.99, 0.99])]
    _step(pf, cache, routing, offers)
    assert not pf.predicting and cache.policy.dormant
    assert pf.counters.issued == 0 and pf.counters.offered == 0 and pf.counters.dormant_steps == 1
    assert cache.stats().misses == 4 and cache.policy.protected == frozenset()


# ---- the overlap estimate ---------------------------------------------------------------------------------


class _Counters:
    """What `OverlapEstimate` reads of the cache (`stats()`: stall, demand misses, reading time), advanced by hand."""

    def __init__(self) -> None:
        self.stall_s, self.misses, self.reading_s, self.now = 0.0, 0, 0.0, 0.0

    def stats(self):
        return self

    def forward(self, seconds: float, stall: float, misses: int, *, reading: float = 0.0) -> None:
        self.now += seconds
        self.stall_s += stall
        self.misses += misses
        self.reading_s += reading


def test_the_overlap_estimate_is_lookahead_compute_over_read_time():
    c = _Counters()
    est = OverlapEstimate(c, layers=2, lookahead=1, every=4, initial=1.0, clock=lambda: c.now)
    for _ in range(4):  # 10 ms forwards, 6 ms of them waiting for 2 reads: 2 ms compute per layer, 3 ms per read
        est.begin()
        c.forward(0.010, 0.006, 2)
        est.end()
    assert est.overlap == pytest.approx(0.7 * 1.0 + 0.3 * (2 / 3))


def test_the_link_is_busy_for_the_share_of_the_window_a_read_was_in_progress():
    c = _Counters()
    est = OverlapEstimate(c, layers=2, lookahead=1, every=4, clock=lambda: c.now)
    assert est.busy is None  # nothing measured yet
    for _ in range(4):  # 10 ms forwards reading for 9 ms of each
        est.begin()
        c.forward(0.010, 0.006, 2, reading=0.009)
        est.end()
    assert est.busy == pytest.approx(0.9)
    for n in range(4):  # 10 ms forwards reading 6 ms, and 10 ms between forwards (sampling) reading 2 ms
        if n:
            c.forward(0.010, 0.0, 0, reading=0.002)
        est.begin()
        c.forward(0.010, 0.006, 2, reading=0.006)
        est.end()
    assert est.busy == pytest.approx(0.7 * 0.9 + 0.3 * (4 * 0.006 + 3 * 0.002) / 0.070)
    for _ in range(4):  # every read ahead, no demand miss: still measured
        est.begin()
        c.forward(0.010, 0.0, 0, reading=0.010)
        est.end()
    assert est.busy == pytest.approx(0.7 * (0.7 * 0.9 + 0.3 * 0.030 / 0.070) + 0.3 * 1.0)


def test_a_busy_link_refuses_a_doubtful_read_ahead_that_an_idle_one_admits():
    # A free slot and a read that overlap hides whole: only the contention makes a wasted read ahead cost anything.
    for busy, contention, issued in ((None, 0.25, 1), (0.1, 0.25, 1), (1.0, 1.0, 0)):
        cache = _cache(PredictivePolicy())
        pf = PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1], lookahead=1,
                                  width=2)  # overlap measured: 1 until the first window closes
        pf.estimate.busy = busy
        assert pf.contention == contention
        _step(pf, cache, [(0,), (1,)], [(0, [0], [0.3])])
        assert pf.counters.issued == issued


def test_the_overlap_estimate_ignores_time_between_forwards_and_forwards_it_does_not_measure():
    c = _Counters()
    est = OverlapEstimate(c, layers=2, lookahead=1, every=4, initial=1.0, clock=lambda: c.now)
    for n in range(12):
        if n == 5:  # a prefill (or a step the trial ran without prediction) in the middle of a window: dropped
            est.interrupt()
            c.forward(0.500, 0.100, 9)
            continue
        est.begin()
        c.forward(0.010, 0.006, 2)
        est.end()
        c.forward(0.300, 0.0, 0)  # sampling, or steps decoded without prediction: no layer's compute
    first = 0.7 * 1.0 + 0.3 * (2 / 3)  # steps 0-3; step 4's window is dropped at 5, steps 6-9 make the second
    assert est.overlap == pytest.approx(0.7 * first + 0.3 * (2 / 3))


def test_the_admission_a_run_assumed_is_averaged_over_its_predicting_decode_steps():
    cache = _cache(PredictivePolicy())
    pf = PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1], lookahead=1,
                              width=2)
    assert pf.mean_admission is None
    pf.begin_step(decode_rows=0)  # a prefill: not a decode step
    assert pf.mean_admission is None
    pf.begin_step(decode_rows=1)  # overlap 1 (nothing measured yet), contention the floor
    pf.estimate.per_layer, pf.estimate.busy = 0.5, 0.75
    pf.begin_step(decode_rows=1)
    assert pf.mean_admission == pytest.approx((0.75, 0.5))


# ---- the window read ahead ------------------------------------------------------------------------------------


def _whole_step(read_ahead, *, per_layer=None, overlap=None, slots=8):
    """A prefetcher over 3 layers, offered all of them before the step (as a whole-step predictor offers), the
    overlap measured (`per_layer`) or fixed; what it issued before any layer ran, by layer."""
    cache = _cache(PredictivePolicy(), slots=slots, layers=(0, 1, 2))
    pf = PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1, 2], lookahead=1,
                              width=2, admission=AdmissionConfig(overlap=overlap, read_share=1.0),
                              read_ahead=read_ahead)
    if per_layer is not None:
        pf.estimate.per_layer = per_layer
    pf.begin_step(decode_rows=1)
    pf.offer_layers([0, 1, 2], [[[0]], [[1]], [[2]]], [[[0.99]], [[0.99]], [[0.99]]])
    return pf, {layer: experts for layer, experts in pf._issued.items() if experts}


def test_offers_made_before_the_forward_are_read_the_lookahead_ahead_unless_reads_are_dear():
    for read_ahead, per_layer, window in ((None, 0.3, 1), (0, 3.0, 1), (0, 0.3, 2), (1, 0.3, 1), (2, 3.0, 2),
                                          (5, 3.0, 5)):
        pf, issued = _whole_step(read_ahead, per_layer=per_layer)
        assert pf.window == window, (read_ahead, per_layer)
        assert list(issued) == [0, 1, 2][: window]  # layer 0 is due at once; the window says how many more
        assert pf.overlap == pytest.approx(window * per_layer)
        assert pf._per_layer_cap == 8 // (window + 1)


def test_the_window_follows_the_measured_overlap_step_by_step():
    pf, _ = _whole_step(0, per_layer=0.3)
    assert pf.window == 2
    pf.estimate.per_layer = 1.5  # reads became cheap: the next step reads one layer ahead again
    pf.begin_step(decode_rows=1)
    assert pf.window == 1 and pf.overlap == pytest.approx(1.5)
    pf.begin_step(decode_rows=0)  # a prefill is not counted
    assert pf.windows == {2: 1, 1: 1}
    # What the run assumed, as for `lookahead` layers whatever the window: a replay chooses the same windows from it.
    assert pf.mean_admission[0] == pytest.approx((0.3 + 1.5) / 2)


def test_a_fixed_overlap_is_for_the_lookahead_and_chooses_the_window_as_a_measured_one():
    pf, issued = _whole_step(0, overlap=0.4)
    assert pf.window == 2 and list(issued) == [0, 1] and pf.overlap == pytest.approx(0.8)
    pf, issued = _whole_step(0, overlap=1.0)
    assert pf.window == 1 and list(issued) == [0]
    pf.fix_overlap(0.2)
    pf.begin_step(decode_rows=1)
    assert pf.window == 2 and pf.overlap == pytest.approx(0.4)


def test_a_negative_read_ahead_is_refused():
    cache = _cache(PredictivePolicy())
    with pytest.raises(MoeflowError, match="read-ahead must be >= 0"):
        PredictivePrefetcher(cache, TransferEngine(cache, background=False).prefetch, layers=[0, 1], read_ahead=-1)
