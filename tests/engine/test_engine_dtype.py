"""A 16-bit checkpoint keeps its dtype on the CPU under dtype "auto" (expert memory is not doubled), exactly as
transformers loads it; `dtype` still asks for another."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeflow

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_checkpoint(request, tiny_checkpoints, tmp_path_factory):
    """The tiny Mixtral saved in 16 bits, the way such checkpoints are published."""
    dtype = request.param
    path = tmp_path_factory.mktemp(str(dtype).removeprefix("torch.")) / "mixtral"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"], dtype=dtype).save_pretrained(path)
    for f in tiny_checkpoints["mixtral"].glob("tokenizer*"):
        shutil.copy(f, path)
    return path, dtype


def _expert_numel(engine) -> int:
    """Elements of one expert (gate, up and down projections) in the checkpoint."""
    cfg = engine.model.config
    return 3 * cfg.hidden_size * cfg.intermediate_size


def test_auto_keeps_the_checkpoint_dtype_on_the_cpu(half_checkpoint):
    path, dtype = half_checkpoint
    with moeflow.load(path, expert_budget="50%") as engine:
        assert engine.dtype == dtype
        stats = engine.stats()
        assert stats.slot_bytes == _expert_numel(engine) * dtype.itemsize  # 2 bytes an element, not fp32's 4
        assert all(p.dtype == dtype for p in engine.model.parameters() if p.device.type != "meta")
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
    assert stats.misses > 0 and stats.resident_peak_bytes <= stats.budget_bytes
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    want = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT) :]
    assert result.token_ids == want.tolist()


def test_dtype_option_still_chooses(half_checkpoint):
    path, _ = half_checkpoint
    with moeflow.load(path, expert_budget="all", dtype="float32") as engine:
        assert engine.dtype == torch.float32
        assert engine.stats().slot_bytes == _expert_numel(engine) * 4
