"""Small checkpoints of every supported family, built with transformers' own config classes.

Used by the tests and benchmarks (models cannot be downloaded here). Random weights, saved with
`save_pretrained`, so the on-disk layout is exactly what transformers writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")  # the default-size fixtures


def tiny_config(
    family: str, *, num_experts: int = 8, top_k: int = 2, layers: int = 2, vocab: int = 128, **overrides: object
):
    """A config of `family` small enough for a unit test (hidden 32, a few layers); `overrides` win."""
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=top_k,
        max_position_embeddings=256,
        eos_token_id=vocab - 1,
        bos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "mixtral":
        return tf.MixtralConfig(**{"intermediate_size": 48, "num_local_experts": num_experts, **common})
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**{
            "intermediate_size": 48, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
            "num_experts": num_experts, "decoder_sparse_step": 1, **common,
        })  # fmt: skip
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{
            "intermediate_size": 48, "moe_intermediate_size": 24, "head_dim": 8, "num_experts": num_experts, **common,
        })  # fmt: skip
    if family == "olmoe":
        return tf.OlmoeConfig(**{"intermediate_size": 24, "num_experts": num_experts, **common})
    if family == "deepseek_v3":
        common = {**common, "num_hidden_layers": layers + 1, "num_key_value_heads": 4, **overrides}
        return tf.DeepseekV3Config(**{
            "intermediate_size": 48, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
            "n_routed_experts": num_experts, "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "kv_lora_rank": 16,
            "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, **common,
        })  # fmt: skip
    raise ValueError(f"unknown family {family!r}; one of {FAMILY_NAMES}")


def save_char_tokenizer(path: str | Path, vocab: int = 128) -> None:
    """A character-level tokenizer (printable ASCII) so tiny checkpoints take text prompts too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    table = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}, "</s>": vocab - 1}
    assert len(table) <= vocab
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)


# Families beyond the first five: each built by `generic_tiny_config` from its own config class, with the
# overrides its model code needs to be small (hybrid layer patterns, MLA ranks, linear-attention heads).
# Sizes are deliberately awkward: 7 experts (not a power of two), top-3, hidden 36.
FAMILY_OVERRIDES: dict[str, dict[str, object]] = {
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "glm4_moe": dict(first_k_dense_replace=1, n_group=1, topk_group=1, layers=3),
    "deepseek_v2": dict(first_k_dense_replace=1, n_group=None, topk_group=None, topk_method="greedy", layers=3,
                        num_key_value_heads=3),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_layer_end_index=2, layers=3),
    "jamba": dict(layers=4, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0,
                  mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=18, mamba_d_state=4,
                             mamba_n_groups=1, mamba_chunk_size=8, shared_intermediate_size=28),
    "granitemoeshared": dict(shared_intermediate_size=28),
    "lfm2_moe": dict(num_dense_layers=1, layers=3, layer_types=["full_attention", "conv", "full_attention"]),
    "dots1": dict(first_k_dense_replace=1, n_shared_experts=1, layers=3),
    "exaone_moe": dict(first_k_dense_replace=1, layers=3, sliding_window=4),
    "solar_open": dict(n_group=1, topk_group=1),
    "glm4_moe_lite": dict(num_key_value_heads=3),
    "deepseek_v32": dict(num_key_value_heads=3, first_k_dense_replace=1, n_group=1, topk_group=1, layers=3,
                         index_n_heads=2, index_head_dim=8, index_topk=4),
    "laguna": dict(layers=3),
    "afmoe": dict(num_dense_layers=1, layers=3),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], first_k_dense_replace=0,
                        num_key_value_heads=3, linear_head_dim=12, linear_num_heads=3),
    "hunyuan_v1_moe": dict(moe_topk=3),
    "glm_moe_dsa": dict(num_key_value_heads=3, first_k_dense_replace=1, n_group=1, topk_group=1, layers=3,
                        index_n_heads=2, index_head_dim=8, index_topk=4),
    "hy_v4": dict(layers=3),
    "gemma4_text": dict(enable_moe_block=True, per_layer_config={}, layer_types=["sliding_attention", "full_attention"],
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, sliding_window=4),
}
# Every family the engine-exactness suite runs (tests/engine/test_engine_families.py), transformers' model_type
# each. The first ones get the full matrix of budgets, policies and stores; the rest a lean one.
TESTED_WITH = "5.24.0"  # the transformers version (constraints.txt) the suite ran TESTED_FAMILIES with
FULL_MATRIX_FAMILIES = ("gpt_oss", "qwen3_next", "deepseek_v2", "jamba")
TESTED_FAMILIES = (
    *FULL_MATRIX_FAMILIES,
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "qwen3_5_moe", "qwen3_5_moe_text", "glm4_moe",
    "ernie4_5_moe", "hunyuan_v1_moe", "afmoe", "cohere2_moe", "deepseek_v32", "laguna", "glm4_moe_lite",
    "granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa", "phimoe", "minimax", "minimax_m2",
    "dots1", "lfm2_moe", "flex_olmo", "exaone_moe", "solar_open", "mellum", "kolibri1", "kimi_linear", "lara_mini",
    "gemma4_text", "aria_text", "minimax_m3_vl_text", "glm_moe_dsa", "hy_v4",
)  # fmt: skip

# Vision-language model types whose language model transformers' AutoModelForCausalLM serves: their text model_type.
_VISION_LANGUAGE = {"qwen3_5_moe": "qwen3_5_moe_text"}
_EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k_experts")
_SHARED_INTER = ("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size")
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _knows(config: object, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - a per-layer attribute (gemma4) refuses a global read: it is known
        return True


def generic_tiny_config(
    model_type: str,
    *,
    num_experts: int = 7,
    top_k: int = 3,
    hidden: int = 36,
    heads: int = 3,
    kv_heads: int = 1,
    head_dim: int = 12,
    inter: int = 20,
    layers: int = 2,
    vocab: int = 128,
    **overrides: object,
):
    """A small config of any MoE `model_type`, from its own config class: keys the class knows are set
    (whatever it calls its expert count, top-k and sizes); `overrides` and FAMILY_OVERRIDES win."""
    if model_type in _VISION_LANGUAGE:  # the checkpoint a user downloads: a small vision tower beside the text model
        text = generic_tiny_config(_VISION_LANGUAGE[model_type], num_experts=num_experts, top_k=top_k, hidden=hidden,
                                   heads=heads, kv_heads=kv_heads, head_dim=head_dim, inter=inter, layers=layers,
                                   vocab=vocab, **overrides)  # fmt: skip
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden)
        return tf.AutoConfig.for_model(model_type, text_config=text.to_dict(), vision_config=vision)
    cls = type(tf.AutoConfig.for_model(model_type))
    known = cls()
    wanted: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=2 * inter,
        moe_intermediate_size=inter,
        max_position_embeddings=256,
        eos_token_id=vocab - 1,
        bos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=False,
        **dict.fromkeys(_EXPERT_COUNT, num_experts),
        **dict.fromkeys(_TOP_K, top_k),
        **dict.fromkeys(_SHARED_INTER, inter + 8),
        **_MLA,
    )
    if not hasattr(known, "moe_intermediate_size"):
        wanted["intermediate_size"] = inter  # the experts' own size
    family = dict(FAMILY_OVERRIDES.get(model_type, {}))
    wanted["num_hidden_layers"] = family.pop("layers", wanted["num_hidden_layers"])
    wanted.update(family)
    wanted.update(overrides)
    kw = {k: v for k, v in wanted.items() if _knows(known, k) or k in family or k in overrides}
    return cls(**kw)


def family_config(family: str, **config_kw: object):
    """The config the tests build `family`'s tiny checkpoint from."""
    return tiny_config(family, **config_kw) if family in FAMILY_NAMES else generic_tiny_config(family, **config_kw)


_RANDOM_BIASES = ("e_score_correction_bias", "gate_up_proj_bias", "down_proj_bias", "router.bias", "expert_bias")


def save_tiny_checkpoint(
    family: str, path: str | Path, *, seed: int = 0, tokenizer: bool = False, **config_kw: object
) -> Path:
    """Build a random `family` model and save it as a Hugging Face folder at `path`."""
    torch.manual_seed(seed)
    config = family_config(family, **config_kw)
    # A vision-language family is saved whole (vision tower and all), as its checkpoints are published.
    auto = tf.AutoModelForImageTextToText if family in _VISION_LANGUAGE else tf.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Non-zero routing and expert biases (transformers initialises them to zero), so the correction
        # bias of grouped sigmoid routing and gpt-oss's expert and router biases are exercised.
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(_RANDOM_BIASES) and t.is_floating_point():
                t.normal_(0, 0.1)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer:
        save_char_tokenizer(path, config.get_text_config(decoder=True).vocab_size)
    return path
