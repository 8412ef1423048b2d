import os

# Triton kernels launch only under the interpreter on a CPU-only host; this must be set before any
# kernel module is imported (Triton reads it when the kernels are defined).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small random checkpoint per supported family (with a character tokenizer), built once."""
    from moeflow.testing import FAMILY_NAMES, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_checkpoint(fam, root / fam, tokenizer=True) for fam in FAMILY_NAMES}


@pytest.fixture(scope="session")
def transformers_greedy(tiny_checkpoints: dict):
    """`greedy(family, prompt_ids, new_tokens)`: plain transformers' greedy tokens (fp32), computed once."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def greedy(family: str, prompt: list[int], new_tokens: int) -> list[int]:
        key = (family, tuple(prompt), new_tokens)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family], dtype=torch.float32)
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens)
            cache[key] = ids[0, len(prompt) :].tolist()
        return cache[key]

    return greedy


class _LazyCheckpoints(dict):
    """family -> a tiny awkward-size checkpoint of it (7 experts, top-3, hidden 36), built on first use."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str):
        from moeflow.testing import save_tiny_checkpoint

        self[family] = path = save_tiny_checkpoint(family, self.root / family)
        return path


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every family of `moeflow.testing.TESTED_FAMILIES`, built lazily (a run selecting one family builds one)."""
    return _LazyCheckpoints(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def family_greedy(family_checkpoints: dict):
    """`greedy(family, prompt_ids, new_tokens)`: plain transformers' greedy tokens on `family_checkpoints`."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def greedy(family: str, prompt: list[int], new_tokens: int) -> list[int]:
        key = (family, tuple(prompt), new_tokens)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(family_checkpoints[family], dtype=torch.float32)
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens)
            cache[key] = ids[0, len(prompt) :].tolist()
        return cache[key]

    return greedy
