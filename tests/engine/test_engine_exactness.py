"""Greedy tokens through moeflow equal plain transformers for every family, budget, policy and store."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeflow
from moeflow.offload.cache import ExpertCache
from moeflow.testing import FAMILY_NAMES

PROMPT = [3, 17, 29, 44, 5, 61, 90, 12, 7, 33, 101, 58]  # 12 tokens: prefill touches most experts
NEW_TOKENS = 12


def _minimum_budget(path) -> int:
    """Exactly one layer's top-k worth of expert bytes: the smallest budget the engine accepts."""
    with moeflow.load(path, expert_budget="all") as engine:
        return engine.top_k * engine.cache.pool.slot_bytes


@pytest.mark.parametrize("store", ["disk", "ram"])
@pytest.mark.parametrize("policy", ["auto", "lru", "lfu", "lrfu"])
@pytest.mark.parametrize("budget", ["all", "50%", "25%", "minimum"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_equals_transformers(tiny_checkpoints, transformers_greedy, family, budget, policy, store):
    path = tiny_checkpoints[family]
    spec = _minimum_budget(path) if budget == "minimum" else budget
    with moeflow.load(path, expert_budget=spec, policy=policy, store=store) as engine:
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
    assert result.token_ids == transformers_greedy(family, PROMPT, NEW_TOKENS)
    assert stats.resident_peak_bytes <= stats.budget_bytes
    if budget in ("25%", "minimum"):
        assert stats.misses > stats.capacity_slots  # the budget really forced evictions and re-reads


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_equals_transformers_with_experts_read_in_parts(tiny_checkpoints, transformers_greedy, family,
                                                               monkeypatch):  # fmt: skip
    """Demand reads in parts of one 4 KiB block each, run by several threads (`DiskStore.read_parts`): the same
    tokens, and the same bytes read as whole reads (the parts tile each expert's aligned range)."""
    path = tiny_checkpoints[family]
    runs = {}
    for parts in (False, True):
        if parts:
            monkeypatch.setattr("moeflow.offload.store.READ_PART_BYTES", 4096)
        with moeflow.load(path, expert_budget="25%") as engine:
            key = next(iter(engine.checkpoint.experts))
            pool = engine.cache.pool
            split = engine.cache.store.read_parts(key, pool.gate_up_S2ID[0], pool.down_SDI[0])
            big = pool.slot_bytes >= 2 * 4096  # deepseek_v3's tiny experts are one block: read whole
            assert (split is not None and len(split) >= 2) == (parts and big)
            result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            runs[parts] = (result.token_ids, engine.stats())
    assert runs[True][0] == runs[False][0] == transformers_greedy(family, PROMPT, NEW_TOKENS)
    assert runs[True][1].misses == runs[False][1].misses > runs[True][1].capacity_slots
    assert runs[True][1].bytes_read == runs[False][1].bytes_read


def test_minimum_budget_runs_prefill_in_waves(tiny_checkpoints, transformers_greedy):
    """At the minimum (top-k slots) a prefill step needs more experts than fit: it must still be exact."""
    path = tiny_checkpoints["mixtral"]
    with moeflow.load(path, expert_budget=_minimum_budget(path)) as engine:
        assert engine.cache.pool.capacity == engine.top_k
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == transformers_greedy("mixtral", PROMPT, NEW_TOKENS)


def test_text_prompt_matches_transformers(tiny_checkpoints):
    from transformers import AutoTokenizer

    path = tiny_checkpoints["qwen3_moe"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok("def f(x):", return_tensors="pt")["input_ids"]
    ref = model.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1] :]
    with moeflow.load(path, expert_budget="25%") as engine:
        result = engine.generate("def f(x):", max_new_tokens=8)
    assert result.token_ids == ref.tolist()
    assert result.text == tok.decode(ref, skip_special_tokens=True)


def test_sharded_checkpoint_with_index(tmp_path):
    from moeflow.testing import save_tiny_checkpoint

    path = tmp_path / "sharded"
    save_tiny_checkpoint("mixtral", path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    ref = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=8)[0, len(PROMPT) :].tolist()
    with moeflow.load(path, expert_budget="25%") as engine:
        assert len({s.file for loc in engine.checkpoint.experts.values() for s in loc.spans}) > 1
        assert engine.generate(PROMPT, max_new_tokens=8).token_ids == ref


def test_fused_expert_tensors_on_disk(tmp_path):
    """A checkpoint saved with transformers' in-memory fused [E, 2I, H] experts is read per expert too."""
    from safetensors.torch import save_file

    from moeflow.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("olmoe", tmp_path / "fused")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    (path / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    ref = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=8)[0, len(PROMPT) :].tolist()
    with moeflow.load(path, expert_budget="50%") as engine:
        assert engine.generate(PROMPT, max_new_tokens=8).token_ids == ref


def test_tied_embeddings(tmp_path):
    from moeflow.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=8)[0, len(PROMPT) :].tolist()
    with moeflow.load(path, expert_budget="25%") as engine:
        assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
        assert engine.generate(PROMPT, max_new_tokens=8).token_ids == ref


def test_sampling_is_seeded(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"], expert_budget="50%") as engine:
        a = engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7).token_ids
        b = engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7).token_ids
        c = engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=8).token_ids
    assert a == b
    assert a != c


@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_greedy_equals_transformers_with_early_gate_up_replies(tiny_checkpoints, transformers_greedy, family, policy,
                                                               tmp_path, monkeypatch):  # fmt: skip
    """Experts read in the reader process with an early reply once their gate/up matrices are in, each layer computing
    their gate/up half then (`ExpertCache.early_gate_up`, the size cut lowered to every expert; the checkpoint widened
    with zero rows so that gate/up and down are separate runs, which leaves transformers' tokens as they were)."""
    from moeflow.tools.widen import widen_experts

    monkeypatch.setattr("moeflow.offload.cache.EARLY_GATE_UP_BYTES", 0)
    landed, landing = [], ExpertCache._gate_up_landed
    monkeypatch.setattr(ExpertCache, "_gate_up_landed", lambda self, s: landed.append(s) or landing(self, s))
    path = widen_experts(tiny_checkpoints[family], tmp_path / "aligned", 256, progress=False)
    options = {"predictor": "gate", "prediction_trial": False} if policy == "predictive" else {}
    with moeflow.load(path, expert_budget="25%", policy=policy, store="disk", **options) as engine:
        assert engine.cache.early_gate_up
        engine.cache.readers.process.wait_ready(block=True)  # else the first reads are the compute thread's own
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        stats = engine.stats()
    assert result.token_ids == transformers_greedy(family, PROMPT, NEW_TOKENS)
    assert stats.misses > stats.capacity_slots and landed
