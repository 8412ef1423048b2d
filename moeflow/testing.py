"""Small checkpoints of every supported family, built with transformers' own config classes.

Used by the tests and benchmarks (models cannot be downloaded here). Random weights, saved with
`save_pretrained`, so the on-disk layout is exactly what transformers writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


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
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=num_experts, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=num_experts,
            decoder_sparse_step=1,
            **common,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, head_dim=8, num_experts=num_experts, **common
        )
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=24, num_experts=num_experts, **common)
    if family == "deepseek_v3":
        common.update(num_hidden_layers=layers + 1, num_key_value_heads=4)
        return tf.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **common,
        )
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


def save_tiny_checkpoint(
    family: str, path: str | Path, *, seed: int = 0, tokenizer: bool = False, **config_kw: object
) -> Path:
    """Build a random `family` model and save it as a Hugging Face folder at `path`."""
    torch.manual_seed(seed)
    config = tiny_config(family, **config_kw)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "deepseek_v3":
        # A non-zero correction bias so grouped routing's bias path is exercised.
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer:
        save_char_tokenizer(path, config.vocab_size)
    return path
