"""Nothing generic lands in site-packages: our kernels are ``moeflow.kernels``, never ``kernels``.

transformers probes ``importlib.util.find_spec("kernels")`` for the Hugging Face Hub's kernels
package. Ours used to be importable under that name; now the only top-level name the
distribution installs is ``moeflow``, so the probe (run where the repository is not on sys.path,
as for an installed user) finds nothing of ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_an_installed_moeflow_offers_no_top_level_kernels(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, moeflow.kernels\n"
        "from transformers.utils import import_utils\n"
        "print(importlib.util.find_spec('kernels'), import_utils.is_kernels_available(), moeflow.kernels.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False", "moeflow.kernels"]


def test_tiny_mixtral_loads_and_runs_with_our_kernels_imported(tmp_path: Path) -> None:
    import moeflow.kernels  # noqa: F401  (ours, imported before transformers looks for the Hub's)
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
