"""Prefetch admission by expected cost: the decision, its online estimates, and the prefetcher that uses them.

Deterministic scenarios on the real `ExpertCache` over a meta-device pool and a store that moves nothing.
"""

import pytest
import torch

from moeflow.offload.admission import AdmissionConfig, Calibration, ReuseRates, admit, net_gain
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import serve_layer
from moeflow.offload.plans import RoutingPlan
from moeflow.offload.policy import LRUPolicy, PredictivePolicy
from moeflow.offload.prefetch import PredictivePrefetcher
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


def test_rank_only_predictions_are_calibrated_per_rank():
    cal = Calibration(AdmissionConfig())
    for _ in range(50):
        cal.observe(None, used=True, rank=0)
        cal.observe(None, used=False, rank=1)
    assert cal.probability(None, rank=0) > 0.9 and cal.probability(None, rank=1) < 0.1


def test_reuse_rates_follow_observed_gaps():
    rates = ReuseRates(max_gap=8, refresh=1)
    assert rates.reuse(A) == rates.prior  # never used
    for step in range(4, 200, 4):  # experts come back every fourth step
        rates.step = step
        rates.on_use(A)
    rates.step = 197
    assert rates.reuse(A) < 0.1  # idle 1 step: not yet
    rates.step = 200
    assert rates.reuse(A) > 0.9  # idle 4 steps: now it is due
    rates.step = 205
    assert rates.reuse(B) == rates.prior
    rates.on_use(B)
    rates.step = 206
    assert rates.reuse(B) < 0.1  # every expert shares what the gaps say


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
    assert cache.stats().misses - misses == lru.stats().misses - lru_misses  # misses as LRU's, no worse


def test_the_byte_cap_binds_per_token():
    cache = _cache(PredictivePolicy(), slots=8)
    pf = _prefetcher(cache, overlap=8.0, read_share=0.25)  # width 2 x 2 layers x 0.25: one read per token
    _step(pf, cache, [(0, 1), (2, 3)], [(0, [0, 1], [0.99, 0.99]), (1, [2, 3], [0.99, 0.99])])
    assert pf.counters.issued == 1 and pf.counters.refused == 3


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
