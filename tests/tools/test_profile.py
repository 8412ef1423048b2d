"""Profiling replay: Belady is the offline optimum, replay counts what the live engine counts, and the
trace analyses agree with the cache."""

from functools import cache
from itertools import combinations

import numpy as np
import pytest

import moeflow
from moeflow.config import EngineConfig
from moeflow.errors import MoeflowError
from moeflow.offload.policy import BeladyPolicy
from moeflow.offload.transfer import TransferEngine
from moeflow.tools.profile.analysis import activation_counts, coactivation, reuse_distances
from moeflow.tools.profile.live import live_run
from moeflow.tools.profile.replay import replay
from moeflow.tools.profile.setting import BudgetPoint, Geometry, parse_budgets, parse_policies
from moeflow.tools.trace import FORMAT, Trace, record_trace


def synthetic_trace(experts_NLK: np.ndarray, num_experts: int) -> Trace:
    N, L, K = experts_NLK.shape
    zeros = np.zeros(N, dtype=np.int32)
    meta = {"format": FORMAT, "layers": list(range(L)), "num_experts": num_experts, "top_k": K}
    return Trace(meta=meta, token_ids=zeros, positions=np.arange(N, dtype=np.int32), seq_ids=zeros,
                 doc_ids=zeros, experts=experts_NLK.astype(np.int16),
                 weights=np.ones(experts_NLK.shape, dtype=np.float16))


def random_routing(rng: np.random.Generator, N: int, L: int, E: int, K: int) -> np.ndarray:
    """Skewed top-k routing (distinct experts per token and layer), like a real router's."""
    p = rng.dirichlet(np.full(E, 0.5), size=L)
    return np.stack([[rng.choice(E, K, replace=False, p=p[l]) for l in range(L)] for _ in range(N)])


def geometry_for(trace: Trace) -> Geometry:
    return Geometry(layers=tuple(trace.layers), num_experts=trace.num_experts, top_k=trace.top_k, inter=4, hidden=4,
                    expert_bytes=1000)


def slots(n: int) -> BudgetPoint:
    return BudgetPoint(spec=f"{n} slots", fraction=0.0, slots=n)


def optimal_misses(experts_NLK: np.ndarray, capacity: int) -> int:
    """Brute force over every demand-eviction choice: the fewest misses any eviction order achieves."""
    N, L, _ = experts_NLK.shape
    requests = [frozenset((l, int(e)) for e in experts_NLK[n, l]) for n in range(N) for l in range(L)]

    @cache
    def best(t: int, resident: frozenset) -> int:
        if t == len(requests):
            return 0
        need = requests[t]
        missing = len(need - resident)
        overflow = len(resident) + missing - capacity
        if overflow <= 0:
            return missing + best(t + 1, resident | need)
        return missing + min(
            best(t + 1, (resident - frozenset(drop)) | need) for drop in combinations(sorted(resident - need), overflow)
        )

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    K = 1 + seed % 2
    experts = random_routing(rng, N=7, L=2, E=4, K=K)
    trace = synthetic_trace(experts, 4)
    for capacity in range(K, 5):
        got = replay(trace, geometry_for(trace), policy="belady", budget=slots(capacity)).stats
        assert got.misses == optimal_misses(experts, capacity), (capacity, experts.tolist())
        assert got.hits + got.misses == experts.size


@pytest.mark.parametrize("seed", range(6))
def test_belady_beats_online_policies(seed):
    rng = np.random.default_rng(100 + seed)
    trace = synthetic_trace(random_routing(rng, N=300, L=3, E=8, K=2), 8)
    geometry = geometry_for(trace)
    for capacity in (2, 4, 6, 12):
        belady = replay(trace, geometry, policy="belady", budget=slots(capacity)).stats.misses
        for policy in ("auto", "lru", "lfu", "lrfu"):
            assert belady <= replay(trace, geometry, policy=policy, budget=slots(capacity)).stats.misses


def test_a_prefill_span_is_one_uncounted_step_that_leaves_the_prompts_experts_resident():
    # One layer, top-1, 2 slots: a prompt routed to 0 and 1, then decode tokens 1, 0, 2, 0.
    trace = synthetic_trace(np.array([0, 1, 1, 0, 2, 0])[:, None, None], 4)
    geometry = geometry_for(trace)
    r = replay(trace, geometry, policy="lru", budget=slots(2), prefill=[(0, 2)])
    # The prompt's step reads 0 and 1 together (not counted); then 1 and 0 hit, 2 evicts 1, 0 hits.
    assert (r.tokens, r.stats.hits, r.stats.misses, r.stats.bytes_read) == (4, 3, 1, 1000)
    assert (r.stats.per_layer[0].hits, r.stats.per_layer[0].misses, r.stats.per_layer[0].bytes_read) == (3, 1, 1000)
    every = replay(trace, geometry, policy="lru", budget=slots(2))  # the prompt's tokens as decode steps, counted
    assert (every.tokens, every.stats.hits, every.stats.misses) == (6, 3, 3)
    with pytest.raises(MoeflowError, match="belady"):
        replay(trace, geometry, policy="belady", budget=slots(2), prefill=[(0, 2)])


def test_belady_evicts_the_farthest_next_use():
    # One layer, top-1: token n uses expert experts[n]. Times are token indices.
    experts = np.array([0, 1, 2, 1, 0, 3, 2])[:, None, None]
    policy = BeladyPolicy(experts, [5])
    for key in [(5, 0), (5, 1), (5, 2)]:  # tokens 0, 1, 2 consumed
        policy.on_access(key)
    # Next uses: expert 0 at 4, expert 1 at 3, expert 2 at 6; expert 3 at 5; expert 7 never.
    assert policy.victim([(5, 0), (5, 1), (5, 2)]) == (5, 2)
    assert policy.victim([(5, 0), (5, 1)]) == (5, 0)
    assert policy.victim([(5, 1), (5, 7)]) == (5, 7)


def test_lru_hits_are_reuse_distances_below_capacity():
    # One layer, top-1: an access hits LRU with C slots exactly when its stack distance is below C.
    rng = np.random.default_rng(7)
    trace = synthetic_trace(random_routing(rng, N=500, L=1, E=10, K=1), 10)
    dist = reuse_distances(trace)
    for capacity in (1, 3, 6):
        hits = replay(trace, geometry_for(trace), policy="lru", budget=slots(capacity)).stats.hits
        assert hits == int(((dist >= 0) & (dist < capacity)).sum())


def test_activation_and_coactivation_counts():
    experts = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 1]]])  # N=2, L=2, K=2
    trace = synthetic_trace(experts, 4)
    assert activation_counts(trace).tolist() == [[2, 2, 0, 0], [0, 1, 2, 1]]
    co = coactivation(trace)[0]
    assert co.sum() == 2 * 2 * 2
    assert co[0, 2] == 2 and co[1, 2] == 2 and co[0, 3] == 1 and co[1, 1] == 1 and co[2].sum() == 0


def test_parse_errors_name_the_fix():
    trace = synthetic_trace(np.zeros((2, 2, 2), dtype=np.int64) + np.array([0, 1]), 8)
    geometry = geometry_for(trace)
    assert [b.slots for b in parse_budgets("12.5%, 25%,100%", geometry)] == [2, 4, 16]
    with pytest.raises(MoeflowError, match="minimum"):
        parse_budgets("5%", geometry)  # below one layer's top-2
    with pytest.raises(MoeflowError, match="cannot read expert budget"):
        parse_budgets("25%,lots", geometry)
    with pytest.raises(MoeflowError, match="names no budget"):
        parse_budgets(" , ", geometry)
    with pytest.raises(MoeflowError, match="choose from: auto, lru, lfu, lrfu, predictive, belady"):
        parse_policies("lru,fifo")
    with pytest.raises(MoeflowError, match="pred"):
        replay(trace, geometry, policy="predictive", budget=slots(4), predictor="gate")


def test_live_engine_refuses_belady(tiny_checkpoints):
    with pytest.raises(MoeflowError, match="moeflow profile --policies belady"):
        EngineConfig(policy="belady")
    with pytest.raises(MoeflowError, match="belady"):
        moeflow.load(tiny_checkpoints["mixtral"], policy="belady")


TINY_TEXT = "def add(a, b):\n    return a + b\n\nclass Box:\n    size = 3\n" * 4  # what the tiny traces record


@pytest.fixture(scope="module")
def tiny_trace(tiny_checkpoints, tmp_path_factory):
    from moeflow.predictor.apply import build_predictor

    text = tmp_path_factory.mktemp("text") / "a.py"
    text.write_text(TINY_TEXT)
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all", store="ram") as engine:
        trace = record_trace(engine, [text], context=40, max_tokens=120, predictors=[build_predictor(engine, "gate")],
                             progress=False)
        geometry = Geometry.of(engine.checkpoint, engine.top_k)
    return trace, geometry


@pytest.mark.parametrize(("policy", "budget"), [("lru", "25%"), ("lru", "50%"), ("lfu", "25%"), ("lrfu", "25%"),
                                                ("auto", "25%"), ("predictive", "25%"), ("predictive", "50%")])
def test_replay_equals_live(tiny_checkpoints, tiny_trace, policy, budget):
    trace, geometry = tiny_trace
    point = parse_budgets(budget, geometry)[0]
    replayed = replay(trace, geometry, policy=policy, budget=point, predictor="gate").stats
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget=budget, policy=policy, predictor="gate",
                      prediction_trial=False) as engine:
        assert engine.cache.pool.capacity == point.slots
        if engine.prefetcher is not None:
            # Fills in the caller's thread, so which slot is still loading cannot depend on thread timing.
            engine.prefetcher.issue = TransferEngine(engine.cache, background=False).prefetch
            engine.prefetcher.fix_overlap(1.0)  # replay's, which cannot measure it
        live, seen_NLK, _ = live_run(engine, trace)
    # One token per forward with a KV cache routes like the trace's teacher-forced chunks.
    np.testing.assert_array_equal(seen_NLK, np.asarray(trace.experts))
    assert [(s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in live.per_layer] == [
        (s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in replayed.per_layer
    ]
    assert 0 < replayed.misses < trace.num_tokens * len(trace.layers) * trace.top_k
    if policy == "predictive":
        assert replayed.prefetch_hits > 0


def test_report_of_a_deep_model_draws(tmp_path):
    # 10 layers: the table drops per-layer columns and co-activation shows first, middle and last pairs.
    from moeflow.tools.profile.plot import plot_report, summary_lines
    from moeflow.tools.profile.run import run_profile

    rng = np.random.default_rng(3)
    trace = synthetic_trace(random_routing(rng, N=60, L=10, E=6, K=2), 6)
    report = run_profile(trace, geometry_for(trace), budgets=[slots(4), slots(12)], policies=["lru", "belady"],
                         links={"link": 1e9})
    assert [pair.layers for pair in report.analysis.coactivation] == [(0, 1), (4, 5), (8, 9)]
    assert "L0" not in summary_lines(report)[0]
    assert plot_report(report, tmp_path / "deep.png").stat().st_size > 10_000


# (overlap, read_ahead, window): read one layer ahead where a layer's compute hides a read, two where it does not
# (chosen), two when asked to
@pytest.mark.parametrize(("overlap", "read_ahead", "window"), [(1.0, 0, 1), (0.4, 0, 2), (1.0, 2, 2)])
def test_replay_equals_live_for_a_predictor_that_answers_the_whole_step(tiny_checkpoints, tiny_trace, tmp_path, overlap,
                                                                        read_ahead, window):
    # token_freq answers every layer before the forward: the engine offers them in one call, and replay must too,
    # and read them as many layers ahead.
    from moeflow.predictor.apply import build_predictor, routing_shape
    from moeflow.predictor.base import save_predictor
    from moeflow.predictor.predictors import TokenFrequencyPredictor

    gate_trace, geometry = tiny_trace
    folder = tmp_path / "predictors"
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="all", store="ram", predictor_dir=folder) as engine:
        predictor = TokenFrequencyPredictor(routing_shape(engine))
        t = gate_trace
        predictor.fit(np.asarray(t.token_ids), np.asarray(t.positions), np.asarray(t.experts))
        save_predictor(predictor, engine.checkpoint.path, folder=folder)
        text = tmp_path / "a.py"
        text.write_text(TINY_TEXT)
        trace = record_trace(engine, [text], context=40, max_tokens=120,
                             predictors=[build_predictor(engine, "token_freq")], progress=False)
    point = parse_budgets("25%", geometry)[0]
    replayed = replay(trace, geometry, policy="predictive", budget=point, predictor="token_freq", overlap=overlap,
                      read_ahead=read_ahead).stats
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%", policy="predictive", predictor="token_freq",
                      predictor_dir=folder, prediction_trial=False, next_token_prefetch=False,
                      read_ahead=read_ahead) as engine:
        engine.prefetcher.issue = TransferEngine(engine.cache, background=False).prefetch
        engine.prefetcher.fix_overlap(overlap)
        live, _, _ = live_run(engine, trace)
        assert set(engine.prefetcher.windows) == {window}
    assert [(s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in live.per_layer] == [
        (s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in replayed.per_layer
    ]
    assert replayed.prefetch_hits > 0


@pytest.mark.parametrize(("policy", "budget"), [("predictive", "25%"), ("predictive", "50%"), ("auto", "25%")])
def test_replay_equals_live_when_a_reuse_model_evicts(tiny_checkpoints, tiny_trace, tmp_path, policy, budget):
    from moeflow.offload.reuse import LearnedReuse, ReuseModel, ReuseShape

    trace, geometry = tiny_trace
    model = ReuseModel(ReuseShape(layers=geometry.layers, num_experts=geometry.num_experts, hidden=16))
    model.fit(np.asarray(trace.experts), epochs=3, progress=False)
    folder = tmp_path / "predictors"
    model.save(folder)
    point = parse_budgets(budget, geometry)[0]
    predictor = "gate" if policy == "predictive" else None
    replayed = replay(trace, geometry, policy=policy, budget=point, predictor=predictor, reuse=model).stats
    options = {"predictor": predictor, "prediction_trial": False} if predictor else {}
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget=budget, policy=policy, predictor_dir=folder,
                      **options) as engine:
        policy_ = engine.cache.policy
        assert isinstance(policy_.next_use if policy == "predictive" else policy_.estimate, LearnedReuse)
        if predictor:
            engine.prefetcher.issue = TransferEngine(engine.cache, background=False).prefetch
            engine.prefetcher.fix_overlap(1.0)
        live, _, _ = live_run(engine, trace)
    assert [(s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in live.per_layer] == [
        (s.hits, s.misses, s.prefetch_hits, s.wasted_prefetches) for s in replayed.per_layer
    ]
    assert replayed.misses > 0
