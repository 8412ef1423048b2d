"""The reuse model: trained on what the live policy will see, answering from it incrementally, saved and loaded
safely, and evicting better than recency where routing has learnable structure."""

import json

import numpy as np
import pytest
import torch

from moeflow.errors import MoeflowError
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import serve_layer
from moeflow.offload.plans import RoutingPlan
from moeflow.offload.policy import AutoPolicy, LRFUPolicy, LRUPolicy, PredictivePolicy
from moeflow.offload.reuse import LearnedReuse, ReuseHistory, ReuseModel, ReuseShape, reuse_files

LAYERS = (0, 2, 5)  # MoE layer indices need not be 0..L-1
E = 6


def _random_model(seed: int = 0) -> ReuseModel:
    model = ReuseModel(ReuseShape(layers=LAYERS, num_experts=E, horizon=3, hidden=16))
    rng = np.random.default_rng(seed)
    for name in ("w1_FH", "b1_H", "w2_HO", "b2_O"):
        setattr(model, name, rng.normal(size=getattr(model, name).shape).astype(np.float32))
    return model


def _feed(reuse: LearnedReuse, experts_NLK: np.ndarray, n: int, p: int, first_step: int = 1) -> None:
    """Steps 0..n - 1 whole and step n up to layer position p, as the policy passes them on."""
    for m in range(n + 1):
        reuse.begin_step(first_step + m)
        for pos, layer in enumerate(LAYERS):
            if m == n and pos > p:
                return
            for e in experts_NLK[m, pos]:
                reuse.on_use((layer, int(e)), first_step + m)


@pytest.mark.parametrize(("n", "p"), [(0, -1), (0, 1), (5, -1), (7, 0), (7, 2), (11, 1)])
def test_live_features_are_the_features_it_was_trained_on(n, p):
    rng = np.random.default_rng(1)
    experts_NLK = np.sort(rng.integers(0, E, size=(16, len(LAYERS), 2)), axis=-1)  # repeats within a layer too
    history = ReuseHistory.of(experts_NLK, num_experts=E, horizon=3)
    reuse = LearnedReuse(_random_model())
    _feed(reuse, experts_NLK, n, p)
    x, _ = history.samples(np.array([n]), np.array([p]))
    np.testing.assert_allclose(reuse.features_F(), x[0], rtol=1e-5, atol=1e-6)


def test_targets_are_about_this_step_for_layers_to_come_and_the_next_steps_for_layers_done():
    experts_NLK = np.zeros((6, len(LAYERS), 1), np.int64)
    experts_NLK[3, 0, 0] = 1  # expert 1 of the first layer, used at step 3 only
    experts_NLK[4, 2, 0] = 2  # expert 2 of the last layer, used at step 4 only
    history = ReuseHistory.of(experts_NLK, num_experts=E, horizon=2)
    _, y = history.samples(np.array([2, 3, 3, 4]), np.array([-1, -1, 0, 1]))
    first_1, last_2 = 0 * E + 1, 2 * E + 2
    assert y[0, first_1] == 1  # step 2, nothing run: step 3 is within 2 steps
    assert y[1, first_1] == 1  # step 3 before its first layer: its own use counts
    assert y[2, first_1] == 0  # step 3 after the first layer: steps 4, 5 do not use it
    assert y[3, last_2] == 1  # step 4, last layer not yet run: its use at step 4 counts


def test_answers_kept_up_to_date_equal_answers_worked_out_afresh():
    model = _random_model(2)
    reuse = LearnedReuse(model)
    keys = [(layer, e) for layer in LAYERS for e in range(E)]
    rng = np.random.default_rng(3)
    step = 1
    for _ in range(60):
        step += int(rng.choice([0, 0, 1, 1, 3]))  # uses within a step, next steps, gaps (dormant stretches)
        reuse.on_use((LAYERS[rng.integers(len(LAYERS))], int(rng.integers(E))), step)
        reuse.on_use((7, 0), step)  # not a layer the model knows: ignored
        np.testing.assert_allclose(reuse.probabilities(keys), model.probabilities_F(reuse.features_F()), rtol=1e-4,
                                   atol=1e-6)
    assert reuse.probability((7, 0)) == 0.0


def _hot_and_cold(steps: int, seed: int) -> np.ndarray:
    """Each layer, each step: one of two hot experts and one of six cold ones, at random."""
    rng = np.random.default_rng(seed)
    hot = rng.integers(0, 2, size=(steps, len(LAYERS)))
    cold = rng.integers(2, 8, size=(steps, len(LAYERS)))
    return np.stack([hot, cold], axis=-1)


class _NullStore:
    direct_io = False

    def read_into(self, key, gate_up, down):
        return 1

    def close(self):
        pass


def _misses(policy, experts_NLK, slots):
    pool = SlotPool(capacity=slots, inter=2, hidden=2, dtype=torch.float32, device=torch.device("meta"))
    cache = ExpertCache(pool=pool, store=_NullStore(), policy=policy, layers=list(LAYERS), budget_bytes=slots * 48)
    for n in range(len(experts_NLK)):
        if isinstance(policy, PredictivePolicy):
            policy.begin_step()
        for pos, layer in enumerate(LAYERS):
            ids = tuple(sorted(set(experts_NLK[n, pos].tolist())))
            serve_layer(cache, RoutingPlan(layer=layer, expert_ids=ids, num_tokens=1))
    return cache.stats().misses


def test_a_trained_model_keeps_the_hot_experts_that_recency_drops():
    # Seven slots hold the six hot experts and the cold one being served; each step also brings three cold ones,
    # which LRU keeps in place of hot ones. A model trained on such routing learns that a cold expert is rarely
    # used again soon.
    model = ReuseModel(ReuseShape(layers=LAYERS, num_experts=8, horizon=4, hidden=32))
    losses = model.fit(_hot_and_cold(3000, seed=0), epochs=6, progress=False)
    assert losses[-1] < losses[0]
    test = _hot_and_cold(400, seed=1)
    learned = PredictivePolicy()
    learned.estimate_with(LearnedReuse(model))
    learned_misses, lru_misses = _misses(learned, test, slots=7), _misses(LRUPolicy(), test, slots=7)
    cold_uses = test.shape[0] * len(LAYERS)
    assert learned_misses <= cold_uses + 12  # the hot experts stay: misses are the cold ones (and the first fill)
    assert lru_misses > 1.2 * learned_misses
    assert not learned.by_recency


def test_saved_and_loaded_it_answers_the_same(tmp_path):
    model = _random_model(4)
    model.save(tmp_path, {"train_tokens": 7})
    loaded = ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E)
    x = np.random.default_rng(5).random(model.shape.width).astype(np.float32)
    np.testing.assert_array_equal(loaded.probabilities_F(x), model.probabilities_F(x))
    assert json.loads(reuse_files(tmp_path)[1].read_text())["training"] == {"train_tokens": 7}


def test_a_missing_corrupt_or_foreign_model_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(MoeflowError, match="no reuse model in .*predictor train --predictors reuse"):
        ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E)
    _random_model().save(tmp_path)
    with pytest.raises(MoeflowError, match="trained for another model"):
        ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E + 1)
    tensors, record = reuse_files(tmp_path)
    tensors.write_bytes(b"not safetensors")
    with pytest.raises(MoeflowError, match="not a readable safetensors file"):
        ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E)
    record.write_text("{")
    with pytest.raises(MoeflowError, match="not a readable reuse model record"):
        ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E)
    other = ReuseModel(ReuseShape(layers=LAYERS, num_experts=E, hidden=8))
    other.save(tmp_path)
    record.write_text(record.read_text().replace('"hidden": 8', '"hidden": 16'))
    with pytest.raises(MoeflowError, match="does not hold a reuse model .*w1_FH"):
        ReuseModel.load(tmp_path, layers=LAYERS, num_experts=E)


def test_a_dormant_policy_goes_on_evicting_by_its_trained_model():
    model = ReuseModel(ReuseShape(layers=LAYERS, num_experts=8, horizon=4, hidden=32))
    model.fit(_hot_and_cold(3000, seed=0), epochs=6, progress=False)
    test = _hot_and_cold(400, seed=1)
    awake, dormant = PredictivePolicy(), PredictivePolicy()
    for policy in (awake, dormant):
        policy.estimate_with(LearnedReuse(model))
    dormant.dormant = True  # the prediction trial paused prediction: no reads ahead, but eviction stays learned
    assert _misses(dormant, test, slots=7) == _misses(awake, test, slots=7) < _misses(LRUPolicy(), test, slots=7)


class _Backwards:
    """A trained model's answers turned around: the experts it expects are the ones this one does not."""

    def __init__(self, reuse: LearnedReuse) -> None:
        self.reuse = reuse
        self.begin_step, self.on_use = reuse.begin_step, reuse.on_use

    def probabilities(self, keys):
        return [1.0 - p for p in self.reuse.probabilities(keys)]


class _AlwaysByEstimate(AutoPolicy):
    choice = "reuse"  # whatever the shadows say


def test_auto_evicts_by_a_trained_model_while_it_misses_least_and_by_recency_or_lrfu_when_it_is_wrong():
    model = ReuseModel(ReuseShape(layers=LAYERS, num_experts=8, horizon=4, hidden=32))
    model.fit(_hot_and_cold(3000, seed=0), epochs=6, progress=False)
    test = _hot_and_cold(400, seed=1)

    def misses(policy, estimate=None):
        if estimate is not None:
            policy.estimate_with(estimate)
        return _misses(policy, test, slots=7)

    best = min(misses(LRUPolicy()), misses(LRFUPolicy()))  # LRFU, here
    learned = misses(_AlwaysByEstimate(), LearnedReuse(model))
    assert learned < best  # the model is worth following here...
    right = AutoPolicy()
    assert misses(right, LearnedReuse(model)) <= learned + 12 and right.choice == "reuse"  # ...and auto follows it
    worst = misses(_AlwaysByEstimate(), _Backwards(LearnedReuse(model)))
    assert worst > 1.2 * best  # a model that is wrong is worse than either...
    wrong = AutoPolicy()
    assert misses(wrong, _Backwards(LearnedReuse(model))) - best <= 0.2 * (worst - best)  # ...and auto does not follow
    assert wrong.choice != "reuse"
    assert AutoPolicy().choice == "lrfu" and right.step == len(test)  # without a model: LRU or LRFU; a step a token
