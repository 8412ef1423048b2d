"""The streaming API: the text increments add up to exactly the non-streaming text, multi-byte characters
split over tokens included, and the tokens are the same."""

from __future__ import annotations

import shutil

import pytest

import moeflow
from moeflow.config import DEFAULT_MODEL
from moeflow.testing import save_tiny_checkpoint

PROMPT = "héllo 🦊 日本語"


@pytest.fixture(scope="module")
def byte_level_model(tmp_path_factory: pytest.TempPathFactory):
    """A random tiny Mixtral with the shipped model's byte-level BPE (4096 tokens): random output is full of
    tokens that end inside a multi-byte character."""
    path = save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("bytes") / "m", vocab=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


@pytest.mark.parametrize("seed", range(3))
def test_stream_adds_up_to_the_text_with_split_characters(byte_level_model, seed):
    with moeflow.load(byte_level_model, expert_budget="50%") as engine:
        whole = engine.generate(PROMPT, max_new_tokens=48, temperature=1.0, seed=seed)
        stream = engine.stream(PROMPT, max_new_tokens=48, temperature=1.0, seed=seed)
        pieces = list(stream)
        split = [t for t in whole.token_ids if engine.tokenizer.decode([t]).endswith("\ufffd")]
    assert split, "the output must hold a token that ends inside a character, or this shows nothing"
    assert "".join(pieces) == whole.text
    assert len(pieces) > 10 and all(pieces), "one non-empty increment per token or so"
    assert stream.result.token_ids == whole.token_ids and stream.result.text == whole.text


def test_greedy_stream_of_the_shipped_model(tmp_path):
    with moeflow.load(None, expert_budget="25%") as engine:
        whole = engine.generate("def", max_new_tokens=32)
        run = engine.generate("def", max_new_tokens=32, stream=True)
        pieces = list(run)
    assert "".join(pieces) == whole.text and run.result.token_ids == whole.token_ids


def test_result_before_the_end_is_an_error(tiny_checkpoints):
    with moeflow.load(tiny_checkpoints["mixtral"]) as engine:
        stream = engine.stream("abc", max_new_tokens=4)
        with pytest.raises(RuntimeError, match="iterate it to the end"):
            stream.result  # noqa: B018
