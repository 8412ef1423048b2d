"""The I/O-bound benchmark model: the shipped model with zero-widened experts gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeflow
from moeflow.engine import DEFAULT_MODEL
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.tools.widen import widen_experts

PROMPT = "def parse_args(argv):\n    "
NEW_TOKENS = 24
WIDE = 320  # the shipped model's experts are 192 wide; not a power of two on purpose


@pytest.fixture(scope="module")
def widened(tmp_path_factory: pytest.TempPathFactory):
    return widen_experts(DEFAULT_MODEL, tmp_path_factory.mktemp("wide"), WIDE, progress=False)


@pytest.fixture(scope="module")
def shipped_greedy() -> list[int]:
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()


def test_widened_experts_are_zero_padded_and_bigger(widened):
    small, wide = open_checkpoint(DEFAULT_MODEL), open_checkpoint(widened)
    assert wide.config["intermediate_size"] == WIDE and wide.moe_layers == small.moe_layers
    assert wide.expert_bytes_on_disk == small.expert_bytes_on_disk * WIDE // 192
    assert sorted(p.name for p in widened.glob("*.safetensors")) == [
        "model-dense.safetensors", *(f"model-layer-{layer}.safetensors" for layer in small.moe_layers)
    ]


@pytest.mark.parametrize("options", [
    dict(expert_budget="25%", policy="lru"),  # why: misses read the wide experts from disk
    dict(expert_budget="25%", policy="predictive", predictor="path"),  # why: the shipped predictors still apply
])  # fmt: skip
def test_widened_model_generates_the_shipped_models_tokens(widened, shipped_greedy, options):
    with moeflow.load(widened, **options) as engine:
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert engine.stats().misses > 0
    assert result.token_ids == shipped_greedy


def test_narrowing_is_refused(tmp_path):
    with pytest.raises(MoeflowError, match="widen, not narrow"):
        widen_experts(DEFAULT_MODEL, tmp_path, 64, progress=False)
