"""The shipped default model (moeflow/default_model): loads offline with plain transformers, meets the
issue's constraints, and generates the same greedy tokens through moeflow as through transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from moeflow.training.corpus import corpus_files, read_text, relative_name  # noqa: E402
from moeflow.training.default_model import router_balance_loss  # noqa: E402
from moeflow.training.default_model_eval import EvalReport, window_spans  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[2] / "moeflow" / "default_model"
MAX_BYTES = 40 * 10**6


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1] :].tolist()


def test_config_meets_the_issue_constraints(model):
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert cfg.num_hidden_layers >= 4  # every Mixtral layer is a sparse MoE block
    assert cfg.num_local_experts >= 16
    assert cfg.num_experts_per_tok == 2
    assert cfg.max_position_embeddings >= 512
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_folder_fits_40_mb():
    """The model itself; trained routing predictors (predictors/, ~2 MB) sit next to it, not in it."""
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file() and "predictors" not in p.parts)
    assert size <= MAX_BYTES, f"{size / 1e6:.1f} MB"


def test_safetensors_holds_experts_per_expert(model):
    cfg = model.config
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in range(cfg.num_hidden_layers):
            for expert in range(cfg.num_local_experts):
                for w in ("w1", "w2", "w3"):
                    assert f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight" in keys
        w1 = f.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight").get_shape()
    assert w1 == [cfg.intermediate_size, cfg.hidden_size]
    assert not any("gate_up_proj" in k for k in keys)


def test_tokenizer_round_trips_heldout_text(tokenizer):
    text = read_text(corpus_files("heldout")[0])[:4000]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # BPE compresses code


def test_greedy_generation_is_deterministic_and_says_something(model, tokenizer):
    first = _greedy(model, tokenizer, "def ", 24)
    assert first == _greedy(model, tokenizer, "def ", 24)
    assert tokenizer.decode(first, skip_special_tokens=True).strip()


def test_heldout_and_train_files_are_disjoint_and_listed():
    train = {relative_name(p) for p in corpus_files("train")}
    heldout = [relative_name(p) for p in corpus_files("heldout")]
    assert heldout and train
    assert train.isdisjoint(heldout)
    assert (MODEL_DIR / "heldout_files.txt").read_text().split() == heldout


def test_card_numbers_come_from_metrics_json():
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    report = EvalReport.from_dict(metrics["eval"])
    readme = (MODEL_DIR / "README.md").read_text()
    assert f"{report.perplexity:.2f}" in readme and f"{report.unigram_perplexity:.2f}" in readme
    assert report.perplexity < report.unigram_perplexity
    assert (MODEL_DIR / "loss_curve.png").stat().st_size > 0
    for row in report.load_summary():  # balanced routing: no expert starved on held-out text
        assert row["min_vs_uniform"] >= 0.25, row


def test_greedy_tokens_through_moeflow_equal_transformers(model, tokenizer):
    import moeflow

    engine = moeflow.load(MODEL_DIR, expert_budget="25%", store="disk", policy="lru")
    for prompt in ("def ", "import "):
        expected = _greedy(model, tokenizer, prompt, 32)
        assert engine.generate(prompt, max_new_tokens=32).token_ids == expected


@pytest.mark.parametrize(("n", "context", "stride"), [(2, 8, 4), (9, 8, 4), (100, 8, 4), (513, 512, 256), (50, 8, 8)])
def test_eval_windows_score_every_target_once(n, context, stride):
    scored = []
    for begin, end, first in window_spans(n, context, stride):
        assert end - begin <= context and begin < first <= end + 1
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


def test_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    uniform = (torch.eye(16).repeat(8, 1) * 5.0,)  # every expert first choice equally often
    skewed = (torch.zeros(128, 16).index_fill_(1, torch.tensor([0, 1]), 5.0),)
    assert router_balance_loss(uniform, 1).item() == pytest.approx(1.0, abs=0.05)
    assert router_balance_loss(skewed, 2).item() > 4.0


@pytest.mark.slow
def test_eval_command_reproduces_the_card():
    from moeflow.training.default_model_eval import evaluate

    shipped = EvalReport.from_dict(json.loads((MODEL_DIR / "metrics.json").read_text())["eval"])
    fresh = evaluate(MODEL_DIR)
    assert fresh.heldout_tokens == shipped.heldout_tokens
    assert fresh.perplexity == pytest.approx(shipped.perplexity, rel=1e-4)
    assert fresh.unigram_perplexity == pytest.approx(shipped.unigram_perplexity, rel=1e-9)
    assert fresh.samples == shipped.samples
    for fresh_row, shipped_row in zip(fresh.expert_load, shipped.expert_load):
        assert fresh_row == pytest.approx(shipped_row, abs=1e-4)
