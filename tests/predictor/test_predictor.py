"""Routing predictors: shapes, training on a toy trace, scoring, recording in traces, and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from moeflow.predictor.apply import build_predictor
from moeflow.predictor.base import RoutingShape, load_saved, save_predictor
from moeflow.predictor.predictors import (
    PREDICTORS,
    FrequencyPredictor,
    GateLookahead,
    PathPredictor,
    SklearnPredictor,
    TokenFrequencyPredictor,
    TransitionPredictor,
    context_windows,
    trace_windows,
)

import moeflow
from moeflow.cli import main
from moeflow.errors import MoeflowError
from moeflow.testing import FAMILY_NAMES
from moeflow.tools.predictor_eval import score_predictions, train_predictors
from moeflow.tools.trace import FORMAT, Trace, record_trace

SHAPE = RoutingShape(layers=(0, 1, 2), num_experts=8, top_k=2, vocab_size=40)


def toy_trace(n_seqs: int = 60, seq_len: int = 40, seed: int = 0) -> Trace:
    """Routing that is a fixed function of (previous token, token): learnable from context alone."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SHAPE.vocab_size, size=(n_seqs, seq_len)).astype(np.int32)
    prev = np.concatenate([np.zeros((n_seqs, 1), np.int32), tokens[:, :-1]], axis=1)
    experts = np.zeros((n_seqs, seq_len, 3, 2), np.int16)
    for layer in range(3):
        first = ((tokens + layer) % 4) * 2 + prev % 2
        experts[:, :, layer, 0] = first
        experts[:, :, layer, 1] = (first + 1 + prev % 3) % 8
    experts = experts.reshape(-1, 3, 2)
    n = n_seqs * seq_len
    meta = {"format": FORMAT, "layers": [0, 1, 2], "num_experts": 8, "top_k": 2, "files": ["toy"]}
    return Trace(
        meta=meta,
        token_ids=tokens.reshape(-1),
        positions=np.tile(np.arange(seq_len, dtype=np.int32), n_seqs),
        seq_ids=np.repeat(np.arange(n_seqs, dtype=np.int32), seq_len),
        doc_ids=np.zeros(n, np.int32),
        experts=experts,
        weights=np.full((n, 3, 2), 0.5, np.float16),
    )


def _recall(predictor, trace: Trace) -> float:
    """Recall@k of a context predictor on `trace`, sequence by sequence."""
    hits = total = 0
    for s in np.unique(trace.seq_ids):
        mask = trace.seq_ids == s
        scores = predictor.on_step([trace.token_ids[mask].tolist()], int(mask.sum()))
        for pos in range(3):
            best = torch.topk(scores[pos], 2, dim=-1).indices.numpy()
            true = trace.experts[mask][:, pos]
            hits += sum(len(set(b) & set(t)) for b, t in zip(best, true))
            total += true.size
    return hits / total


def test_windows_respect_sequence_starts():
    win = trace_windows(np.array([5, 6, 7, 8]), np.array([0, 1, 0, 1]), 3, pad_id=99)
    assert win.tolist() == [[99, 99, 5], [99, 5, 6], [99, 99, 7], [99, 7, 8]]
    ctx = context_windows([[1, 2, 3], [4]], 1, 2, pad_id=99)
    assert ctx.tolist() == [[2, 3], [99, 4]]


@pytest.mark.parametrize("cls", [PathPredictor, SklearnPredictor, FrequencyPredictor, TokenFrequencyPredictor])
def test_context_predictors_answer_every_layer_with_scores_per_token(cls):
    trace = toy_trace(n_seqs=8)
    p = cls(SHAPE)
    p.fit(trace.token_ids, trace.positions, trace.experts, epochs=1, progress=False)
    scores = p.on_step([[1, 2, 3], [4, 5]], 2)
    assert sorted(scores) == [0, 1, 2]
    assert all(s.shape == (4, 8) for s in scores.values())


def test_path_predictor_learns_a_context_dependent_routing():
    train, held = toy_trace(seed=0), toy_trace(n_seqs=10, seed=1)
    path = PathPredictor(SHAPE)
    losses = path.fit(train.token_ids, train.positions, train.experts, epochs=30, lr=5e-3, progress=False)
    assert losses[-1] < losses[0] / 2
    freq = FrequencyPredictor(SHAPE)
    freq.fit(train.token_ids, train.positions, train.experts)
    token_only = TokenFrequencyPredictor(SHAPE)
    token_only.fit(train.token_ids, train.positions, train.experts)
    # The routing needs the previous token too: the path network (window 8) sees it, the table can't.
    assert _recall(path, held) > 0.8
    assert _recall(path, held) > _recall(token_only, held) + 0.2 > _recall(freq, held) + 0.2


def test_transition_predicts_from_the_previous_layer_only():
    trace = toy_trace(n_seqs=10)
    p = TransitionPredictor(SHAPE, lookahead=1)
    p.fit(trace.token_ids, trace.positions, trace.experts)
    assert sorted(p.on_step([[1, 2]], 2)) == [0]  # before any routing: the first layer only
    answer = p.on_routing(0, torch.tensor([[1, 2], [3, 4]]))
    assert sorted(answer) == [1] and answer[1].shape == (2, 8)
    assert p.on_routing(2, torch.tensor([[1, 2]])) == {}


def test_save_and_load_next_to_the_model(tmp_path):
    trace = toy_trace(n_seqs=6)
    p = PathPredictor(SHAPE)
    p.fit(trace.token_ids, trace.positions, trace.experts, epochs=1, progress=False)
    save_predictor(p, tmp_path, {"note": "toy"})
    q = load_saved(PathPredictor, tmp_path, SHAPE)
    a, b = p.on_step([[1, 2, 3]], 3), q.on_step([[1, 2, 3]], 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MoeflowError, match="another model shape"):
        load_saved(PathPredictor, tmp_path, RoutingShape((0, 1, 2), 8, 2, 41))
    with pytest.raises(MoeflowError, match="moeflow predictor train"):
        load_saved(TokenFrequencyPredictor, tmp_path, SHAPE)


def test_scores_of_an_oracle_and_of_a_wrong_predictor():
    trace = toy_trace(n_seqs=4)
    true = np.asarray(trace.experts)
    wrong = (true + 4) % 8  # one of the true two only where the true two differ by exactly 4
    oracle = np.concatenate([true, wrong], axis=2).astype(np.int16)
    t = Trace(**{**trace.__dict__, "predictions": {"oracle": oracle, "wrong": oracle[:, :, ::-1].copy()}})
    good = score_predictions(t, "oracle")
    assert good.recall_at_k == 1.0 and good.path_accuracy == 1.0
    bad = score_predictions(t, "wrong")
    assert bad.recall_at_2k == 1.0  # the true ones are ranks 3 and 4
    overlap = [len(set(w) & set(r)) / 2 for w, r in zip(wrong.reshape(-1, 2), true.reshape(-1, 2))]
    assert bad.recall_at_k == pytest.approx(float(np.mean(overlap)))
    assert bad.recall_at_k < 0.5 and bad.path_accuracy < 0.5
    assert [r.layer for r in good.per_layer] == [0, 1, 2]


@pytest.fixture()
def mixtral_copy(tiny_checkpoints, tmp_path):
    """A private copy of the tiny Mixtral (training writes predictors next to the model)."""
    return shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "mixtral")


def test_trace_records_what_each_predictor_said(mixtral_copy, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 20)
    with moeflow.load(mixtral_copy) as engine:
        trace = record_trace(engine, [doc], context=64, progress=False)
        train_predictors(engine, trace, ["token_freq", "transition"], progress=False)
        predictors = [build_predictor(engine, n) for n in ("gate", "token_freq", "transition")]
        traced = record_trace(engine, [doc], context=64, predictors=predictors, progress=False)
    traced.save(tmp_path / "t")
    loaded = Trace.load(tmp_path / "t")
    N, L, K = loaded.experts.shape
    assert set(loaded.predictions) == {"gate", "token_freq", "transition"}
    for pred in loaded.predictions.values():
        assert pred.shape == (N, L, 2 * K) and pred.min() >= 0 and pred.max() < loaded.num_experts
    assert loaded.meta["predictions"]["gate"]["us_per_token"] > 0
    # The text repeats: a table trained on it predicts the repeats well.
    assert score_predictions(loaded, "token_freq").recall_at_2k > 0.8
    sub = loaded.select(np.ones(int(loaded.seq_ids.max()) + 1, bool))
    assert sub.predictions["gate"].shape == loaded.predictions["gate"].shape


def test_unknown_or_untrained_predictor_is_a_clear_error(mixtral_copy):
    with moeflow.load(mixtral_copy) as engine:
        with pytest.raises(MoeflowError, match="unknown predictor 'oracle'"):
            build_predictor(engine, "oracle")
        with pytest.raises(MoeflowError, match="moeflow predictor train"):
            build_predictor(engine, "path")


def test_cli_train_and_eval(mixtral_copy, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("class A:\n    pass\n" * 30)
    args = ["--model", str(mixtral_copy)]
    assert main(["predictor", "train", *args, "--data", str(doc), "--predictors", "path,frequency",
                 "--epochs", "1", "--json", "--out", str(mixtral_copy / "predictors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"]["trained"] and (mixtral_copy / "predictors" / "path.safetensors").is_file()
    assert main(["predictor", "eval", *args, "--data", str(doc), "--json", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in out["predictors"]]
    assert names == ["path", "gate", "frequency"]  # the available ones, registry order
    for p in out["predictors"]:
        assert {"name", "recall_at_k", "recall_at_2k", "path_accuracy", "us_per_token", "per_layer"} <= set(p)
        assert 0 <= p["recall_at_k"] <= p["recall_at_2k"] <= 1
    assert (tmp_path / "ev" / "predictor_eval.png").stat().st_size > 0
    assert main(["predictor", "eval", *args, "--data", str(doc), "--predictors", "nope"]) == 2
    assert "unknown predictor 'nope'" in capsys.readouterr().err


def test_registry_names():
    assert set(PREDICTORS) == {"path", "gate", "sklearn", "frequency", "token_freq", "transition"}


# ---- the fused path pass and the precomputed baselines --------------------------------------------


def _heldout_windows(shape: RoutingShape, per_file: int = 600, files: int = 8) -> np.ndarray:
    """[N, W] windows over the default model's held-out text (never trained on)."""
    from transformers import AutoTokenizer

    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    ids, positions = [], []
    for f in model_corpus(DEFAULT_MODEL, "heldout")[:files]:
        tokens = tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:per_file]
        ids.append(np.asarray(tokens))
        positions.append(np.arange(len(tokens)))
    return trace_windows(np.concatenate(ids), np.concatenate(positions), PathPredictor.window, shape.vocab_size)


def test_fused_path_pass_scores_what_the_trained_network_computes():
    """The folded table (embedding + slot + first Linear) and one pass: the module's scores to float
    rounding and the same ranking of every layer's experts on held-out text."""
    from moeflow.predictor.base import predictor_dir

    from moeflow.config import DEFAULT_MODEL

    shape = RoutingShape.from_dict(json.loads((predictor_dir(DEFAULT_MODEL) / "path.json").read_text())["shape"])
    p = load_saved(PathPredictor, DEFAULT_MODEL, shape)
    win = _heldout_windows(shape)
    with torch.inference_mode():
        want_NLE = p.net(torch.from_numpy(win))
    got_NLE = torch.from_numpy(p.scores_TLE(win))
    torch.testing.assert_close(got_NLE, want_NLE, rtol=1e-5, atol=1e-4)
    E = shape.num_experts
    assert torch.equal(torch.topk(got_NLE, E, dim=-1).indices, torch.topk(want_NLE, E, dim=-1).indices)
    # on_step answers every layer from the histories' last W tokens alone
    history = win[100].tolist()
    answer = p.on_step([[7] * 50 + history], 1)
    assert sorted(answer) == list(range(len(shape.layers)))
    for pos, scores_1E in answer.items():
        torch.testing.assert_close(scores_1E, want_NLE[100:101, pos], rtol=1e-5, atol=1e-4)


def test_path_weights_changed_by_training_are_used_and_a_huge_table_falls_back_to_the_module():
    trace = toy_trace(n_seqs=8)
    p = PathPredictor(SHAPE)
    win = trace_windows(trace.token_ids, trace.positions, p.window, SHAPE.vocab_size)
    before = torch.from_numpy(p.scores_TLE(win))
    p.fit(trace.token_ids, trace.positions, trace.experts, epochs=1, progress=False)
    with torch.inference_mode():
        want = p.net(torch.from_numpy(win))
    torch.testing.assert_close(torch.from_numpy(p.scores_TLE(win)), want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(before, want)
    small = PathPredictor(SHAPE)
    small.restore(p.state())
    small.max_table_bytes = 0  # a vocabulary whose table would not fit: the module itself answers
    assert torch.equal(torch.from_numpy(small.scores_TLE(win)), want)


def test_context_windows_read_only_the_tail_of_long_histories():
    class Tail(list):
        """A history that refuses whole reads: only slices ending at its end are allowed."""

        def __iter__(self):
            raise AssertionError("the whole history was read")

    long = Tail(range(100_000))
    assert context_windows([long, [1, 2]], 1, 3, pad_id=99).tolist() == [[99_997, 99_998, 99_999], [99, 1, 2]]
    assert context_windows([[5, 6, 7]], 3, 2, pad_id=99).tolist() == [[99, 5], [5, 6], [6, 7]]


def test_baselines_answer_what_their_tables_say():
    trace = toy_trace(n_seqs=8)
    hist = [trace.token_ids[:10].tolist(), trace.token_ids[10:13].tolist()]
    tf = TokenFrequencyPredictor(SHAPE)
    tf.fit(trace.token_ids, trace.positions, trace.experts)
    prior_LE = tf.counts_LE / tf.counts_LE.sum(-1, keepdim=True).clamp(min=1)
    want_TLE = tf.table_VLE[[h[-1] for h in hist]] + prior_LE
    got = tf.on_step(hist, 1)
    assert sorted(got) == [0, 1, 2] and all(torch.equal(got[p], want_TLE[:, p]) for p in got)
    fr = FrequencyPredictor(SHAPE)
    fr.fit(trace.token_ids, trace.positions, trace.experts)
    assert all(torch.equal(s, fr.counts_LE[p].expand(2, -1)) for p, s in fr.on_step(hist, 1).items())
    tr = TransitionPredictor(SHAPE, lookahead=1)
    tr.fit(trace.token_ids, trace.positions, trace.experts)
    assert sorted(tr.on_step(hist, 1)) == [0]
    restored = TransitionPredictor(SHAPE, lookahead=1)
    restored.restore(tr.state())
    topk_TK = torch.tensor([[0, 3]])
    want = tr.trans_PEE[0][topk_TK].sum(1) + tr.counts_LE[1] / tr.counts_LE[1].sum()
    torch.testing.assert_close(restored.on_routing(0, topk_TK)[1], want)


def test_sklearn_predictor_keeps_its_decision_function_as_tensors(tmp_path):
    """Its scores are the one-vs-rest classifiers' own decision functions, and it saves as plain tensors."""
    from moeflow.predictor.predictors import multi_hot
    from sklearn.linear_model import SGDClassifier
    from sklearn.multiclass import OneVsRestClassifier

    trace = toy_trace(n_seqs=20)
    p = SklearnPredictor(SHAPE)
    p.fit(trace.token_ids, trace.positions, trace.experts, progress=False)
    histories = [[1, 2, 3], [4, 5], [7]]
    scores = p.on_step(histories, 1)
    x = p._features(context_windows(histories, 1, p.window, SHAPE.vocab_size))
    train_x = p._features(trace_windows(trace.token_ids, trace.positions, p.window, SHAPE.vocab_size))
    hot = multi_hot(np.asarray(trace.experts), SHAPE.num_experts).astype(np.int64)
    for pos in range(3):
        clf = OneVsRestClassifier(SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=8, tol=None, random_state=0))
        reference = clf.fit(train_x, hot[:, pos]).decision_function(x)
        torch.testing.assert_close(scores[pos], torch.from_numpy(reference.astype(np.float32)), rtol=1e-5, atol=1e-5)
    save_predictor(p, tmp_path)
    q = load_saved(SklearnPredictor, tmp_path, SHAPE)
    assert all(torch.equal(q.on_step(histories, 1)[pos], scores[pos]) for pos in range(3))


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MOEFLOW_PWNED'], 'w').write('ran')",))


def test_a_crafted_predictor_file_cannot_run_code(tmp_path, monkeypatch):
    """A pickle (an older moeflow's .pt) is never opened: refused by name, with what to do."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MOEFLOW_PWNED", str(marker))
    folder = tmp_path / "model" / "predictors"
    folder.mkdir(parents=True)
    torch.save({"name": "path", "shape": SHAPE.to_dict(), "lookahead": 1, "state": _RunsCode()}, folder / "path.pt")
    with pytest.raises(MoeflowError, match="path.pt is a predictor saved by an older moeflow as a torch pickle"):
        load_saved(PathPredictor, tmp_path / "model", SHAPE)
    assert not marker.exists()


def test_ranked_probabilities_rank_every_layer_at_once_as_each_alone():
    from moeflow.predictor.apply import ranked_probabilities

    rng = np.random.default_rng(0)
    s_LTE = rng.standard_normal((3, 5, 8)).astype(np.float32) * 4
    for predictor in (PathPredictor(SHAPE), FrequencyPredictor(SHAPE), GateLookahead(SHAPE)):
        scores = np.abs(s_LTE) if isinstance(predictor, FrequencyPredictor) else s_LTE  # counts are >= 0
        ranked_LTM, probs_LTM = ranked_probabilities(predictor, scores, 3, SHAPE.top_k)
        assert ranked_LTM.shape == probs_LTM.shape == (3, 5, 3)
        for layer in range(3):
            ranked_TM, probs_TM = ranked_probabilities(predictor, scores[layer], 3, SHAPE.top_k)
            assert np.array_equal(ranked_LTM[layer], ranked_TM) and np.array_equal(probs_LTM[layer], probs_TM)
        t = torch.from_numpy(scores)
        best = torch.sort(t, dim=-1, descending=True)
        assert np.array_equal(ranked_LTM, best.indices[..., :3].numpy())  # distinct random scores: no ties
        if isinstance(predictor, PathPredictor):  # a classifier's logits: the sigmoid
            want = torch.sigmoid(best.values[..., :3])
        elif isinstance(predictor, GateLookahead):  # a router's logits: softmax x top-k, capped at 1
            want = (torch.softmax(t, -1) * SHAPE.top_k).clamp(max=1.0).gather(-1, best.indices[..., :3])
        else:  # counts: each token's share of its top-k uses
            want = (t * SHAPE.top_k / t.sum(-1, keepdim=True)).clamp(max=1.0).gather(-1, best.indices[..., :3])
        torch.testing.assert_close(torch.from_numpy(probs_LTM), want)
    tied = np.array([[1.0, 3.0, 3.0, 0.5]], dtype=np.float32)
    assert ranked_probabilities(PathPredictor(SHAPE), tied, 3, SHAPE.top_k)[0].tolist() == [[1, 2, 0]]  # lower id


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gate_lookahead_folded_into_numpy_scores_as_the_norm_and_router_do(tiny_checkpoints, family):
    """The RMS norm's weight folded into the router, computed in numpy (which keeps the GIL), gives the scores the
    norm and the router modules give, for every family (DeepSeek-V3: its sigmoid + selection bias too)."""
    import torch.nn.functional as F

    with moeflow.load(tiny_checkpoints[family], expert_budget="all") as engine:
        gate = build_predictor(engine, "gate", lookahead=1)
        assert all(f is not None for f in gate._folded), "every tested family's pre-MoE norm is an RMS norm"
        g = torch.Generator().manual_seed(1)
        for pos in range(-1, gate.num_layers - 1):
            x_TD = torch.randn(5, engine.model.config.hidden_size, generator=g) * 2
            target = max(pos + 1, 0)
            ref = F.linear(gate.norms[target].forward(x_TD), gate.router_weights[target]).float()
            if gate.router_bias[target] is not None:
                ref = torch.sigmoid(ref) + gate.router_bias[target].float()
            got = gate.on_residual(pos, x_TD)[target]
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
            assert (np.argsort(-got, axis=-1)[:, : engine.top_k] == torch.topk(ref, engine.top_k).indices.numpy()).all()
