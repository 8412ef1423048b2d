"""Our top-level ``kernels`` package must not be taken for the Hugging Face Hub's ``kernels``.

transformers probes ``importlib.util.find_spec("kernels")`` (which finds ours), maps the import name
to a distribution (ours is ``moeflow``) and accepts the package if that version is in
[KERNELS_MIN_VERSION, KERNELS_MAX_VERSION). If it did, it would import hub-kernel entry points from
our package and break model loading.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
from packaging import version

import kernels  # noqa: F401  (ours, imported before transformers looks for the Hub's)


def test_transformers_does_not_take_our_kernels_for_the_hub_package() -> None:
    from transformers.utils import import_utils

    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).parent == Path(__file__).parents[1] / "kernels"
    assert import_utils.is_kernels_available() is False
    # Why it is False: our distribution's version is outside the window transformers accepts. If moeflow's
    # version ever enters it, this fails and the package needs renaming.
    ours = version.parse(importlib.metadata.version("moeflow"))
    window = (version.parse(import_utils.KERNELS_MIN_VERSION), version.parse(import_utils.KERNELS_MAX_VERSION))
    assert not window[0] <= ours < window[1]


def test_tiny_mixtral_loads_and_runs_with_our_kernels_importable(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
