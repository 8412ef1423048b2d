"""Every family moeflow serves, from transformers' own config class at awkward sizes (7 experts, top-3,
hidden 36): greedy tokens equal plain transformers', the budget is a ceiling, per-layer stats add up.

Every family runs every budget x policy (predictive: the gate predictor) x store. By default (a bare
`pytest`) only a lean matrix runs: all and the minimum budget, lru and predictive, the disk store, and
for FULL_MATRIX_FAMILIES (biases and clamped SwiGLU, hybrid linear-attention and SSM caches, MLA with
dense-first layers) the minimum budget from disk; the rest is marked slow, which CI runs.
"""

import pytest

import moeflow
from moeflow.errors import BudgetError
from moeflow.testing import FULL_MATRIX_FAMILIES, TESTED_FAMILIES

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 10
BUDGETS = ("all", "50%", "25%", "minimum")
POLICIES = ("lru", "predictive")
STORES = ("disk", "ram")


def _matrix() -> list:
    cases = []
    for family in TESTED_FAMILIES:
        full = family in FULL_MATRIX_FAMILIES
        for budget in BUDGETS:
            for policy in POLICIES:
                for store in STORES:
                    lean = store == "disk" and budget in (("minimum",) if full else ("all", "minimum"))
                    marks = [] if lean else [pytest.mark.slow]
                    cases.append(pytest.param(family, budget, policy, store, marks=marks))
    return cases


def _minimum_budget(path) -> int:
    with moeflow.load(path, expert_budget="all") as engine:
        return engine.top_k * engine.cache.pool.slot_bytes


@pytest.mark.parametrize(("family", "budget", "policy", "store"), _matrix())
def test_greedy_equals_transformers(family_checkpoints, family_greedy, family, budget, policy, store):
    path = family_checkpoints[family]
    spec = _minimum_budget(path) if budget == "minimum" else budget
    kw = {"predictor": "gate"} if policy == "predictive" else {}
    try:
        loaded = moeflow.load(path, expert_budget=spec, policy=policy, store=store, **kw)
    except BudgetError as e:  # a share of few experts (dense-first, one MoE layer) can be below one layer's top-k
        assert budget in ("50%", "25%") and "the minimum is" in str(e)
        return
    with loaded as engine:
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
        assert engine.checkpoint.family.model_type == engine.model.config.model_type
    assert result.token_ids == family_greedy(family, PROMPT, NEW_TOKENS)
    assert stats.resident_peak_bytes <= stats.budget_bytes
    if budget == "minimum":
        assert stats.misses > stats.capacity_slots  # the budget forced evictions and re-reads


class _CeilingProbe:
    """Wraps the engine's store: every read lands in the slot pool and never beyond its capacity."""

    def __init__(self, engine: moeflow.Engine) -> None:
        self.inner = engine.cache.store
        self.direct_io = self.inner.direct_io
        self.cache = engine.cache
        pool = engine.cache.pool
        self.ranges = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (pool.gate_up_S2ID, pool.down_SDI)]
        self.max_resident = 0
        self.reads = 0

    def _check(self, gate_up, down) -> None:
        for dest in (gate_up, down):
            assert any(lo <= dest.data_ptr() and dest.data_ptr() + dest.nbytes <= hi for lo, hi in self.ranges)
        self.max_resident = max(self.max_resident, len(self.cache.resident()))
        assert len(self.cache.resident()) <= self.cache.pool.capacity
        self.reads += 1

    def read_into(self, key, gate_up, down, *scales) -> int:
        self._check(gate_up, down)
        return self.inner.read_into(key, gate_up, down, *scales)

    def moves(self, key, gate_up, down, scales=None, **plan):  # a read sent to the reader process (the default)
        self._check(gate_up, down)
        return self.inner.moves(key, gate_up, down, scales, **plan)

    def moved(self, key, reply) -> None:
        self.inner.moved(key, reply)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_budget_ceiling_and_per_layer_stats(family_checkpoints, family):
    path = family_checkpoints[family]
    with moeflow.load(path, expert_budget=_minimum_budget(path)) as engine:
        probe = _CeilingProbe(engine)
        engine.cache.store = probe
        engine.generate(PROMPT, max_new_tokens=6)
        stats = engine.stats()
        # No expert weight matrix anywhere but the pool (expert biases stay resident, like the router).
        weights = ("experts.gate_up_proj", "experts.down_proj")
        assert [n for n, _ in engine.model.named_parameters() if n.endswith(weights)] == []
        moe_layers, top_k = engine.checkpoint.moe_layers, engine.top_k
    assert probe.reads == stats.misses > 0
    assert probe.max_resident == stats.capacity_slots == top_k
    assert stats.resident_peak_bytes <= stats.budget_bytes
    assert [s.layer for s in stats.per_layer] == moe_layers
    assert all(s.hits + s.misses > 0 for s in stats.per_layer)  # every MoE layer ran through the cache
    assert sum(s.misses for s in stats.per_layer) == stats.misses
    assert sum(s.hits for s in stats.per_layer) == stats.hits
    assert sum(s.bytes_read for s in stats.per_layer) == stats.bytes_read


@pytest.mark.parametrize("family", ["qwen3_next", "jamba", "gpt_oss"])
def test_a_cache_with_state_serves_one_sequence_at_a_time(family_checkpoints, family_greedy, family):
    """Linear-attention, SSM and sliding-window caches cannot be left-padded into a batch: one sequence decodes
    at a time (exact), and a second one joining is refused with a message saying so."""
    from moeflow.errors import MoeflowError

    with moeflow.load(family_checkpoints[family], expert_budget="50%") as engine:
        for _ in range(2):  # the batch's cache is given back and a new one adopted
            assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids == family_greedy(
                family, PROMPT, NEW_TOKENS
            )
        batch = engine.new_batch()
        seqs = [engine.new_sequence(PROMPT[: 6 + i], max_new_tokens=4) for i in range(2)]
        for seq in seqs:
            batch.prefill(seq)
            batch.add(seq)
        with pytest.raises(MoeflowError, match="one at a time"):
            batch.step()


def test_scheduler_decodes_a_stateful_cache_one_sequence_at_a_time(family_checkpoints, family_greedy):
    from moeflow.scheduler import FifoAdmission, Scheduler

    with moeflow.load(family_checkpoints["qwen3_next"], expert_budget="50%") as engine:
        scheduler = Scheduler(engine, max_batch_size=4, admission=FifoAdmission())
        seqs = [engine.new_sequence(PROMPT[: 8 + i], max_new_tokens=5) for i in range(3)]
        for seq in seqs:
            scheduler.submit(seq)
        scheduler.run_until_idle()
    assert scheduler.max_batch_size == 1 and max(scheduler.batch_sizes) == 1
    for i, seq in enumerate(seqs):
        assert seq.generated == family_greedy("qwen3_next", PROMPT[: 8 + i], 5)
