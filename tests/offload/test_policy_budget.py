"""Pure-Python pieces: eviction policies and budget parsing."""

import pytest

from moeflow.config import EngineConfig
from moeflow.errors import BudgetError
from moeflow.offload.budget import resolve_budget
from moeflow.offload.policy import LFUPolicy, LRUPolicy


def test_lru_evicts_least_recently_used():
    p = LRUPolicy()
    for k in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(k)
        p.on_access(k)
    p.on_access((0, 0))
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)  # only candidates may be chosen (others are pinned)
    p.on_evict((0, 1))
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)


def test_lfu_counts_survive_eviction_and_ties_go_to_lru():
    p = LFUPolicy()
    for k, uses in [((0, 0), 3), ((0, 1), 1), ((0, 2), 1)]:
        p.on_insert(k)
        for _ in range(uses):
            p.on_access(k)
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)  # tie 1 vs 1: (0,1) used earlier
    p.on_evict((0, 0))
    p.on_insert((0, 0))
    p.on_access((0, 0))
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)  # (0,0) keeps its history: 4 uses


def test_unknown_policy_is_refused_by_the_config():
    with pytest.raises(ValueError, match="choose one of: lru, lfu"):
        EngineConfig(policy="fifo")


@pytest.mark.parametrize(
    "spec, slots",
    [("all", 16), ("100%", 16), ("50%", 8), ("25%", 4), ("12.5%", 2), (0.5, 8), ("4KiB", 4), ("4096", 4), (5000, 4)],
)
def test_budget_specs(spec, slots):
    budget = resolve_budget(spec, slot_bytes=1024, total_experts=16, top_k=2)
    assert budget.slots == slots
    assert budget.slots * 1024 <= budget.budget_bytes


def test_budget_larger_than_model_is_capped():
    assert resolve_budget("1GiB", slot_bytes=1024, total_experts=16, top_k=2).slots == 16


@pytest.mark.parametrize("spec", ["10%", "1KiB", "0.1%"])
def test_budget_below_top_k_names_minimum(spec):
    with pytest.raises(BudgetError, match="minimum is 2048 bytes"):
        resolve_budget(spec, slot_bytes=1024, total_experts=16, top_k=2)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("1" + "0" * 309, r"'1000000000000000000\.\.\.000000000' \(312 characters\) is more than 1 EiB"),
        ("9" * 5000, "more than 1 EiB"),  # beyond the digits Python converts to an int by default
        (10**400, r"\(an integer of 1329 bits\) is more than 1 EiB"),
        ("99999999999999999999GiB", "'99999999999999999999GiB' is more than 1 EiB"),
        (2**60 + 1, "more than 1 EiB"),
        (float("nan"), "must be in \\(0, 1\\], got nan"),
        (float("inf"), "must be in \\(0, 1\\], got inf"),
        ("nan%", "percentage must be in \\(0, 100\\]"),
        ("1e309%", "percentage must be in \\(0, 100\\]"),
        ("1e309", "cannot read expert budget '1e309'"),
        (-5, "must be positive"),
        ("-5GiB", "cannot read expert budget"),
    ],
)
def test_absurd_budgets_are_refused_clearly(spec, match):
    with pytest.raises(BudgetError, match=match):
        resolve_budget(spec, slot_bytes=1024, total_experts=16, top_k=2)


def test_the_largest_budget_still_holds_every_expert():
    assert resolve_budget(2**60, slot_bytes=1024, total_experts=16, top_k=2).slots == 16
    assert resolve_budget(str(2**60), slot_bytes=1024, total_experts=16, top_k=2).slots == 16
