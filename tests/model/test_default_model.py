"""The shipped default model (moeflow/default_model): loads offline with plain transformers, meets the
issue's constraints, lists its corpus for the runtime, and generates the same greedy tokens through
moeflow as through transformers. The recipe that made it is tested in tests/recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moeflow.model.corpus import model_corpus  # noqa: E402

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
    text = model_corpus(MODEL_DIR, "heldout")[0].read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # BPE compresses code


def test_greedy_generation_is_deterministic_and_says_something(model, tokenizer):
    first = _greedy(model, tokenizer, "def ", 24)
    assert first == _greedy(model, tokenizer, "def ", 24)
    assert tokenizer.decode(first, skip_special_tokens=True).strip()


def test_folder_lists_disjoint_train_and_heldout_files_that_exist_here():
    train, heldout = model_corpus(MODEL_DIR, "train"), model_corpus(MODEL_DIR, "heldout")
    assert len(heldout) > 20 and len(train) > 10 * len(heldout)
    assert set(train).isdisjoint(heldout)
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())["training"]
    assert (len(train), len(heldout)) == (metrics["train_files"], metrics["heldout_files"])


def test_greedy_tokens_through_moeflow_equal_transformers(model, tokenizer):
    import moeflow

    engine = moeflow.load(MODEL_DIR, expert_budget="25%", store="disk", policy="lru")
    for prompt in ("def ", "import "):
        expected = _greedy(model, tokenizer, prompt, 32)
        assert engine.generate(prompt, max_new_tokens=32).token_ids == expected
