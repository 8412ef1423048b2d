"""Family descriptions derived from transformers: naming on disk, layout in memory, computed refusals."""

import re

import pytest
import transformers as tf

from moeflow.errors import UnsupportedArchitectureError
from moeflow.model.catalog import family_status
from moeflow.model.families import describe
from moeflow.model.quantized import fused_slice_name, stored_expert_source
from moeflow.testing import family_config


def test_mixtral_names_come_from_its_conversion_mapping():
    family = describe(family_config("mixtral"))
    # transformers renames block_sparse_moe -> mlp, then merges w1 (gate) and w3 (up) into gate_up_proj
    assert family.memory_key("model.layers.1.block_sparse_moe.gate.weight")[0] == "model.layers.1.mlp.gate.weight"
    up = family.expert_source("model.layers.1.block_sparse_moe.experts.3.w3.weight")
    assert (up.layer, up.param, up.expert, up.part, up.parts) == (1, "gate_up_proj", 3, 1, 2)
    down = family.expert_source("model.layers.0.block_sparse_moe.experts.5.w2.weight")
    assert (down.param, down.expert, down.part, down.parts) == ("down_proj", 5, 0, 1)
    assert family.expert_source("model.layers.0.input_layernorm.weight") is None


def test_granitemoe_fused_experts_under_a_renamed_key():
    family = describe(family_config("granitemoe"))
    source = family.expert_source("model.layers.0.block_sparse_moe.input_linear.weight")
    assert (source.layer, source.param, source.expert) == (0, "gate_up_proj", None)  # the whole [E, 2I, D]


def test_gpt_oss_layout_from_its_decorator():
    family = describe(family_config("gpt_oss"))
    layout = family.layout
    assert (layout.transposed, layout.interleaved, layout.has_bias) == (True, True, True)
    assert layout.activation == "GptOssExperts._apply_gate"  # clamped SwiGLU with alpha and limit
    # gpt-oss has no conversion mapping: its experts are stored as in memory, fused
    assert family.expert_source("model.layers.0.mlp.experts.gate_up_proj").expert is None
    assert family.expert_source("model.layers.0.mlp.experts.gate_up_proj_bias") is None  # resident, not in slots


def test_quantized_folders_name_one_expert_of_a_fused_tensor_by_its_index():
    family = describe(family_config("gpt_oss"))
    name = fused_slice_name("model.layers.1.mlp.experts.down_proj", 5)
    source = stored_expert_source(family, name)
    assert (source.layer, source.param, source.expert, source.part, source.parts) == (1, "down_proj", 5, 0, 1)
    assert stored_expert_source(family, "model.layers.1.mlp.experts.gate_up_proj_bias.5") is None  # not an expert
    assert stored_expert_source(family, "model.layers.1.self_attn.q_proj.weight") is None
    mixtral = describe(family_config("mixtral"))
    per_expert = stored_expert_source(mixtral, "model.layers.1.block_sparse_moe.experts.3.w3.weight")
    assert (per_expert.expert, per_expert.part) == (3, 1)  # per-expert names as the family spells them
    # a per-expert name with an index appended is no expert: only a fused tensor's slice takes one
    assert stored_expert_source(mixtral, "model.layers.1.block_sparse_moe.experts.3.w3.weight.0") is None


def test_caches_that_cannot_be_batched_are_detected():
    for model_type in ("qwen3_next", "jamba", "gpt_oss", "minimax"):  # linear attention, SSM, sliding, own class
        assert describe(family_config(model_type)).one_sequence_cache, model_type
    assert not describe(family_config("qwen3_moe")).one_sequence_cache


def test_dense_model_refused_with_reason():
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnsupportedArchitectureError, match="'llama' is not supported.*no routed experts"):
        describe(config)


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("jetmoe", "not behind use_experts_implementation: .* is JetMoeParallelExperts"),
        ("llama4_text", "not behind use_experts_implementation: .* is Llama4TextExperts"),
        ("nemotron_h", r"no gate projection \(use_experts_implementation\(has_gate=False\)"),
        ("switch_transformers", "no causal-LM class"),
    ],
)
def test_refusals_name_the_reason(model_type, reason):
    status = family_status(model_type)
    assert status.status == "refused"
    assert re.search(reason, status.detail), status.detail


def test_tested_families_are_described_as_tested():
    for model_type in ("gpt_oss", "qwen3_next", "jamba", "mixtral"):
        assert family_status(model_type).status == "tested"


@pytest.mark.parametrize(("family", "converted"), [("lara_mini", "linear_attn.in_proj_"), ("kimi_linear", "conv1d")])
def test_dense_tensors_transformers_converts_are_converted_alike(family_checkpoints, family, converted):
    """lara_mini splits in_proj_qkvz into four projections while loading, kimi_linear concatenates its q/k/v
    convolutions: moeflow runs the same converters (it refused both families before)."""
    import torch
    from transformers import AutoModelForCausalLM

    import moeflow

    path = family_checkpoints[family]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    with moeflow.load(path, expert_budget="all") as engine:
        ours = {n: p for n, p in engine.model.named_parameters() if converted in n}
    assert ours
    for name, param in ours.items():
        assert torch.equal(param, reference[name]), name
