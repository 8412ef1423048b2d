"""bench/oracle.py: the perfect-foresight contender finds its place in the record, evicts by the horizon it is
given, and decodes the same tokens as LRU with every prediction right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from oracle import OracleReuse, RoutingForesight, attach_oracle, record_routing  # noqa: E402

# One sequence of 3 prompt tokens and 3 generated: 5 fed positions, 2 MoE layers (ids 1 and 3), top-1.
SEQ = {"tokens": [7, 8, 9, 10, 11, 12], "experts_NLK": [[[0], [1]], [[2], [1]], [[0], [3]], [[1], [2]], [[0], [3]]]}
OTHER = {"tokens": [7, 5, 4, 3], "experts_NLK": [[[3], [3]], [[3], [3]], [[3], [3]]]}


def test_foresight_finds_the_sequence_a_forward_continues_and_its_positions():
    f = RoutingForesight([OTHER, SEQ], layers=[1, 3], num_experts=4)
    f.locate([7, 8, 9], n_new=3)  # the prefill
    assert (f.seq, f.start, f.end) == (1, 0, 3)
    f.locate([7, 8, 9, 10], n_new=1)
    assert (f.start, f.end) == (3, 4)
    assert f.experts(3).tolist() == [[1], [2]] and f.experts(4) is not None and f.experts(5) is None
    f.locate([7, 5], n_new=2)
    assert f.seq == 0
    with pytest.raises(RuntimeError, match="record it again"):
        f.locate([7, 8, 6], n_new=1)


def test_routing_that_differs_from_the_record_is_counted():
    f = RoutingForesight([SEQ], layers=[1, 3], num_experts=4)
    f.locate([7, 8, 9, 10], n_new=1)
    f.check(1, np.array([[1]]))
    assert f.disagreements == 0
    f.check(3, np.array([[1]]))
    assert f.disagreements == 1


def test_reuse_counts_this_step_until_its_layer_has_run_then_the_next_horizon_tokens():
    f = RoutingForesight([SEQ], layers=[1, 3], num_experts=4)
    f.locate([7, 8, 9, 10], n_new=1)  # position 3: layer 1 uses 1, layer 3 uses 2
    one, two = OracleReuse(f, horizon=1), OracleReuse(f, horizon=2)
    for r in (one, two):
        r.begin_step(4)
    keys = [(1, 1), (1, 0), (3, 2), (3, 3)]
    assert [p > 0.9 for p in one.probabilities(keys)] == [True, False, True, False]
    # two tokens: position 4 too (layer 1 uses 0, layer 3 uses 3), a little less worth than this token's
    p = two.probabilities(keys)
    assert all(x > 0.9 for x in p) and p[0] > p[1] and p[2] > p[3]
    for r in (one, two):
        r.on_use((1, 1), 4)  # layer 1 has run: its window moves past this token
    assert one.probabilities([(1, 1), (1, 0)]) == [0.0, pytest.approx(1.0)]
    assert two.probabilities([(1, 1), (1, 0)]) == [0.0, pytest.approx(1.0)]  # 1 is not used again in positions 4-5
    f.locate([7, 8, 9, 10, 11, 12], n_new=1)  # past the record's end nothing is known
    assert two.probabilities([(1, 0)]) == [0.0]


@pytest.mark.parametrize("horizon", [1, 2, None])
def test_the_oracle_decodes_lrus_tokens_with_every_prediction_right(tiny_checkpoints: dict, horizon: int | None):
    import moeflow
    from moeflow.config import DEFAULT_MODEL, EngineConfig
    from moeflow.engine import Engine

    # No horizon: eviction by the trained reuse model, which the shipped model has
    path = DEFAULT_MODEL if horizon is None else tiny_checkpoints["mixtral"]
    prompts = [[5, 6, 7, 8], [9, 3, 2]]
    recorded = record_routing(path, prompts, 6, "25%")
    with moeflow.load(path, expert_budget="25%", store="disk", policy="lru") as engine:
        want = [list(engine.generate(p, max_new_tokens=6).token_ids) for p in prompts]
    assert [r["tokens"][len(p) :] for r, p in zip(recorded, prompts)] == want
    engine = Engine(path, EngineConfig(expert_budget="25%", store="disk", policy="predictive", prediction_trial=False))
    with engine:
        foresight = attach_oracle(engine, recorded, horizon)
        got = [list(engine.generate(p, max_new_tokens=6).token_ids) for p in prompts]
        counters = engine.prefetcher.counters
    assert got == want
    assert foresight.disagreements == 0
    assert counters.steps > 0 and counters.precision == 1.0 and counters.recall == 1.0


def test_the_oracle_in_paths_role_needs_a_trained_reuse_model(tiny_checkpoints: dict):
    from moeflow.config import EngineConfig
    from moeflow.engine import Engine

    with Engine(tiny_checkpoints["mixtral"], EngineConfig(expert_budget="25%", policy="predictive")) as engine:
        with pytest.raises(RuntimeError, match="no trained reuse model"):
            attach_oracle(engine, [SEQ], None)
