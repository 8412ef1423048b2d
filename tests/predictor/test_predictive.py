"""Predictive prefetch never changes the output, and the re-batcher returns every sequence exactly once
with its solo tokens."""

import shutil

import numpy as np
import pytest
import torch
from moeflow.predictor import predictors
from moeflow.predictor.predictors import PREDICTORS, GateLookahead
from moeflow.predictor.rebatch import RebatchAdmission

import moeflow
from moeflow.build import make_admission
from moeflow.errors import MoeflowError
from moeflow.offload.admission import NextUse, PredictionTrial
from moeflow.offload.policy import PredictivePolicy
from moeflow.offload.reuse import LearnedReuse
from moeflow.scheduler import Scheduler, run_batch
from moeflow.testing import FAMILY_NAMES
from moeflow.tools.predictor_eval import train_predictors
from moeflow.tools.trace import record_trace

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 10


class AntiGate(GateLookahead):
    """Adversarial: predicts the experts the router likes least, so nearly every prefetch is wasted."""

    name = "anti_gate"

    def on_residual(self, pos, residual_TD):
        return {t: -s for t, s in super().on_residual(pos, residual_TD).items()}


@pytest.fixture()
def anti_gate(monkeypatch):
    monkeypatch.setitem(PREDICTORS, "anti_gate", AntiGate)


@pytest.mark.parametrize("lookahead", [1, 2])
@pytest.mark.parametrize("predictor", ["gate", "anti_gate"])
@pytest.mark.parametrize("budget", ["25%", "12.5%"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_predictive_greedy_equals_transformers(
    tiny_checkpoints, transformers_greedy, anti_gate, family, budget, predictor, lookahead
):
    options = dict(expert_budget=budget, policy="predictive", predictor=predictor, lookahead=lookahead)
    try:
        engine = moeflow.load(tiny_checkpoints[family], **options)
    except MoeflowError as e:  # 12.5% can be below one layer's top-k on the smallest families
        assert "minimum" in str(e) and budget == "12.5%"
        return
    with engine:
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        counters = engine.prefetcher.counters
        stats = engine.stats()
    assert result.token_ids == transformers_greedy(family, PROMPT, NEW_TOKENS)
    assert counters.steps == NEW_TOKENS  # prefill + one per decode step but the last token's
    assert counters.issued > 0 and stats.prefetch_hits <= counters.issued
    if predictor == "anti_gate":
        assert counters.precision < 0.35  # it really was wrong, and the output did not care
    else:
        assert counters.correct > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_switching_prediction_on_and_off_never_changes_the_output(tiny_checkpoints, transformers_greedy, family):
    with moeflow.load(tiny_checkpoints[family], expert_budget="25%", policy="predictive", predictor="gate") as engine:
        # A trial that changes its mind every step: every switch in both directions, mid-generation.
        engine.prefetcher.trial = PredictionTrial(window=2, max_window=2, history=2, settle=0, first_gap=1, growth=1,
                                                  max_gap=1)
        result = engine.generate(PROMPT, max_new_tokens=16)
        counters = engine.prefetcher.counters
    assert result.token_ids == transformers_greedy(family, PROMPT, 16)
    assert 0 < counters.dormant_steps < counters.steps and counters.issued > 0


def test_gate_lookahead_beats_its_adversary(tiny_checkpoints, anti_gate):
    recalls = {}
    for name in ("gate", "anti_gate"):
        with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="50%", policy="predictive", predictor=name) as e:
            e.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            recalls[name] = e.prefetcher.counters.recall
    assert recalls["gate"] > recalls["anti_gate"] + 0.2


def test_predictive_policy_keeps_protected_experts():
    p = PredictivePolicy()
    for key in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(key)
    p.protect([(0, 0)])
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    p.demote([(0, 2)])
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 2)
    assert p.victim([(0, 0)]) == (0, 0)  # nothing else can go
    p.release([(0, 0)])
    assert p.victim([(0, 0), (0, 1)]) == (0, 0)


def test_bad_predictive_options(tiny_checkpoints):
    path = tiny_checkpoints["mixtral"]
    with pytest.raises(MoeflowError, match="unknown predictor 'crystal_ball'"):
        moeflow.load(path, policy="predictive", predictor="crystal_ball")
    with pytest.raises(MoeflowError, match="only in offline replay"):
        moeflow.load(path, policy="belady")
    with pytest.raises(MoeflowError, match="lookahead must be at least 1"):
        moeflow.load(path, policy="predictive", lookahead=0)
    with pytest.raises(MoeflowError, match="moeflow predictor train"):
        moeflow.load(path, policy="predictive", predictor="path")


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 120, (int(k),), generator=g).tolist() for k in torch.randint(2, 16, (n,), generator=g)]


def test_rebatcher_returns_each_sequence_once_with_its_solo_tokens(tiny_checkpoints):
    prompts = _prompts(11)
    lengths = [3, 9, 5, 12, 2, 7, 10, 4, 8, 6, 11]
    rng = np.random.default_rng(0)
    fixed = {}

    def predict(seqs):  # a deterministic stand-in predictor: each sequence keeps its own expert set
        return np.stack([fixed.setdefault(s.seq_id, rng.random((2, 8)) < 0.25) for s in seqs])

    admission = RebatchAdmission(predict, pool_factor=4, max_skips=3)
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="25%") as engine:
        solo = [engine.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, lengths)]
        members_per_step = []
        scheduler = Scheduler(engine, max_batch_size=3, admission=admission,
                              on_step=lambda b: members_per_step.append([s.seq_id for s in b.members]))
        seqs = [engine.new_sequence(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
        for s in seqs:
            scheduler.submit(s)
        finished = []
        while not scheduler.idle:
            finished.extend(scheduler.step())
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert [s.generated for s in seqs] == solo
    assert max(len(m) for m in members_per_step) == 3 and len(scheduler.active) == 0
    # Nobody waits more than max_skips steps in a row while active.
    last_seen = {}
    for step, members in enumerate(members_per_step):
        for sid in members:
            assert step - last_seen.get(sid, step) <= 3 + 1
            last_seen[sid] = step


def test_rebatcher_groups_overlapping_sequences():
    sets = {i: np.zeros((1, 8), bool) for i in range(6)}
    for i in range(6):
        sets[i][0, i % 2] = True  # even ids share expert 0, odd ids expert 1

    class S:
        def __init__(self, i):
            self.seq_id = i

    admission = RebatchAdmission(lambda seqs: np.stack([sets[s.seq_id] for s in seqs]), max_skips=5)
    pool = [S(i) for i in range(6)]
    first = admission.select(pool, 3)
    assert [s.seq_id for s in first] == [0, 2, 4]  # the oldest, then those sharing its expert
    second = admission.select(pool, 3)
    assert [s.seq_id for s in second] == [1, 3, 5]  # the skipped ones now waited longest


def test_rebatcher_default_fairness_bound_leaves_the_grouping_to_choose():
    """A pool of 8x the batch decodes each member one step in 8: a bound of 8 skips would pick the batches itself."""

    class S:
        def __init__(self, i):
            self.seq_id = i

    sets = {i: np.eye(2, 8, k=i % 2, dtype=bool)[None, 0] for i in range(16)}  # even ids use expert 0, odd expert 1

    def predict(seqs):
        return np.stack([sets[s.seq_id] for s in seqs])

    pool = [S(i) for i in range(16)]

    def clusters_per_step(admission):
        return [len({s.seq_id % 2 for s in admission.select(pool, 2)}) for _ in range(48)]

    default = RebatchAdmission(predict)
    assert (default.pool_factor, default.max_skips) == (8, 24) and default.pool_size(2) == 16
    assert clusters_per_step(default) == [1] * 48  # every batch shares its expert, and nobody starves:
    assert max(default._skips.values()) < 24
    assert sum(clusters_per_step(RebatchAdmission(predict, max_skips=4))) > 48  # the bound forces mixed batches


def test_rebatcher_refills_its_pool_a_batch_at_a_time():
    """Refilling place by place prefilled every new prompt alone (each read most experts of every layer)."""
    admission = RebatchAdmission(lambda seqs: np.zeros((len(seqs), 1, 8), bool), pool_factor=4)
    waiting, active = list(range(20)), list(range(10))  # pool of 12 at batch 3: 10 active, 2 places free
    assert admission.choose(waiting, active, free=2) == []  # fewer than a batch free, and a batch still decodes
    assert admission.choose(waiting, list(range(9)), free=3) == [0, 1, 2]  # a batch's worth free
    assert admission.choose(waiting, [0, 1], free=10) == waiting[:10]  # the pool no longer fills a batch
    assert admission.choose([7], active, free=2) == [7]  # the last prompts do not wait for company
    assert admission.choose(waiting, [], free=12) == waiting[:12]  # the first fill


def test_rebatch_admission_for_engine(tiny_checkpoints, tmp_path):
    path = shutil.copytree(tiny_checkpoints["qwen3_moe"], tmp_path / "m")
    doc = tmp_path / "d.txt"
    doc.write_text("for i in range(10):\n    print(i)\n" * 10)
    prompts = _prompts(6)
    with moeflow.load(path, expert_budget="50%") as engine:
        with pytest.raises(MoeflowError, match="moeflow predictor train"):
            make_admission("rebatch", engine)
        train_predictors(engine, record_trace(engine, [doc], progress=False), ["token_freq"], progress=False)
        admission = make_admission("rebatch", engine)
        run = run_batch(engine, prompts, batch_size=2, admission=admission, max_new_tokens=6)
        solo = [engine.generate(p, max_new_tokens=6).token_ids for p in prompts]
    assert [r.token_ids for r in run.results] == solo
    assert len(run.distinct_experts) == len(run.batch_sizes) and max(run.batch_sizes) == 2
    with pytest.raises(MoeflowError, match="unknown admission policy"):
        make_admission("lottery", engine)


def _trained(checkpoint, tmp_path, name: str, **train):
    """A predictor folder holding `name` trained on a short repetitive document."""
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return [x * i for i in range(10)]\n" * 30)
    folder = tmp_path / "predictors"
    with moeflow.load(checkpoint, expert_budget="all", store="ram") as engine:
        train_predictors(engine, record_trace(engine, [doc], progress=False), [name], out=folder, progress=False,
                         **train)
    return folder


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_trained_reuse_model_evicts_and_the_output_is_unchanged(tiny_checkpoints, transformers_greedy, tmp_path,
                                                                    family):
    folder = _trained(tiny_checkpoints[family], tmp_path, "reuse", epochs=2)
    options = dict(expert_budget="25%", policy="predictive", predictor="gate", predictor_dir=folder)
    with moeflow.load(tiny_checkpoints[family], **options) as engine:
        assert isinstance(engine.cache.policy.next_use, LearnedReuse)
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
    assert result.token_ids == transformers_greedy(family, PROMPT, NEW_TOKENS)
    assert stats.misses > 0  # it did evict
    with moeflow.load(tiny_checkpoints[family], **options, reuse_model=False) as engine:
        assert isinstance(engine.cache.policy.next_use, NextUse)
    # The default policy, auto, has it among its candidates
    with moeflow.load(tiny_checkpoints[family], expert_budget="25%", predictor_dir=folder) as engine:
        assert isinstance(engine.cache.policy.estimate, LearnedReuse)
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert engine.stats().misses > 0
    assert result.token_ids == transformers_greedy(family, PROMPT, NEW_TOKENS)
    with moeflow.load(tiny_checkpoints[family], expert_budget="25%", predictor_dir=folder, reuse_model=False) as engine:
        assert engine.cache.policy.estimate is None


def test_the_path_predictor_is_folded_as_the_engine_loads_not_at_the_first_request(tiny_checkpoints,
                                                                                   transformers_greedy, tmp_path,
                                                                                   monkeypatch):
    folder = _trained(tiny_checkpoints["mixtral"], tmp_path, "path", epochs=1)
    folds = []
    fold = predictors._FoldedPath.__init__
    monkeypatch.setattr(predictors._FoldedPath, "__init__", lambda self, net: folds.append(fold(self, net)))
    options = dict(expert_budget="25%", policy="predictive", predictor="path", predictor_dir=folder)
    with moeflow.load(tiny_checkpoints["mixtral"], **options) as engine:
        assert len(folds) == 1
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert len(folds) == 1
    assert result.token_ids == transformers_greedy("mixtral", PROMPT, NEW_TOKENS)


# An RMS norm before a float32 head without bias runs in numpy; any other pair in torch.
@pytest.mark.parametrize(("norm", "bias"), [("rms", False), ("rms", True), ("layer", False)])
def test_the_next_token_lens_is_the_heads_next_token_distribution_times_each_tokens_first_layer_use(norm, bias):
    from moeflow.predictor.ahead import NextTokenLens
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    torch.manual_seed(0)
    V, D, E, K = 6, 4, 5, 2

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.norm = MixtralRMSNorm(D) if norm == "rms" else torch.nn.LayerNorm(D)
            torch.nn.init.normal_(self.model.norm.weight, 1.0, 0.5)
            self.lm_head = torch.nn.Linear(D, V, bias=bias)

        def get_output_embeddings(self):
            return self.lm_head

    model = Model()
    table_VE = torch.zeros(V, E)
    table_VE[0, [1, 2]] = 3.0  # token 0 seen 3 times, always on experts 1 and 2
    table_VE[1, [0, 1]] = 1.0  # token 1 once, on 0 and 1; tokens 2.. never seen
    lens = NextTokenLens.from_table(model, table_VE, K)
    assert (lens._numpy is not None) == (norm == "rms" and not bias)
    prior_E = table_VE.sum(0) / 4.0  # 4 occurrences in all
    use_VE = (table_VE + prior_E) / (table_VE.sum(-1, keepdim=True) / K + 1.0)
    assert torch.allclose(use_VE.sum(-1), torch.full((V,), float(K)))  # each token uses K experts
    r_TD = torch.randn(3, D)
    p_TV = torch.softmax(model.lm_head(model.model.norm(r_TD)), -1)
    np.testing.assert_allclose(lens.probabilities(r_TD), (p_TV @ use_VE).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_next_token_prefetch_reads_ahead_and_never_changes_the_output(tiny_checkpoints, transformers_greedy, tmp_path,
                                                                       family):
    folder = _trained(tiny_checkpoints[family], tmp_path, "token_freq")
    options = dict(expert_budget="25%", policy="predictive", predictor="gate", predictor_dir=folder,
                   prediction_trial=False)
    expected = transformers_greedy(family, PROMPT, NEW_TOKENS)
    for per_layer in (0.99, 4.0):  # an expert's read just dearer than a layer's compute, then cheaper: as measured
        with moeflow.load(tiny_checkpoints[family], **options) as engine:
            engine.prefetcher.estimate.per_layer, engine.prefetcher.estimate.every = per_layer, 10**9  # kept so
            assert engine.prefetcher.reads_dear == (per_layer < 1)
            result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            counters = engine.prefetcher.counters
            batch = run_batch(engine, _prompts(3), batch_size=3, max_new_tokens=4)  # rows offered together
            solo = [engine.generate(p, max_new_tokens=4).token_ids for p in _prompts(3)]
        assert result.token_ids == expected
        assert [r.token_ids for r in batch.results] == solo
        if per_layer < 1:
            assert counters.ahead_issued > 0 and counters.ahead_correct <= counters.ahead_issued
        else:  # where the step's start is early enough for the first layer's reads, the lens is not even run
            assert counters.ahead_offered == 0 and counters.issued > 0
    with moeflow.load(tiny_checkpoints[family], **options, next_token_prefetch=False) as engine:
        engine.prefetcher.estimate.per_layer, engine.prefetcher.estimate.every = 0.25, 10**9
        engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert engine.prefetcher.counters.ahead_offered == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_reading_a_whole_step_predictor_further_ahead_never_changes_the_output(tiny_checkpoints, transformers_greedy,
                                                                              tmp_path, family):
    folder = _trained(tiny_checkpoints[family], tmp_path, "token_freq")
    options = dict(expert_budget="25%", policy="predictive", predictor_dir=folder, prediction_trial=False)
    expected = transformers_greedy(family, PROMPT, NEW_TOKENS)
    for predictor, read_ahead, windows in (("token_freq", 2, {2}), ("token_freq", 0, {2}), ("gate", 2, {1})):
        with moeflow.load(tiny_checkpoints[family], predictor=predictor, read_ahead=read_ahead, **options) as engine:
            prefetcher = engine.prefetcher
            if read_ahead == 0:  # reading an expert dearer than a layer's compute, as measured, and kept so
                prefetcher.estimate.per_layer, prefetcher.estimate.every = 0.25, 10**9
            result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            batch = run_batch(engine, _prompts(3), batch_size=3, max_new_tokens=4)  # rows offered together
            solo = [engine.generate(p, max_new_tokens=4).token_ids for p in _prompts(3)]
        assert result.token_ids == expected, (predictor, read_ahead)
        assert [r.token_ids for r in batch.results] == solo
        # gate offers each layer `lookahead` ahead as it goes: nothing to read further ahead
        assert set(prefetcher.windows) == windows and prefetcher.counters.issued > 0
    with pytest.raises(MoeflowError, match="--read-ahead must be an integer >= 0"):
        moeflow.load(tiny_checkpoints[family], read_ahead=-1)
