"""Streamed text: the increments add up to decoding all ids at once, whatever the chunking."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moeflow.engine.detok import IncrementalText

TEXTS = [
    "Once upon a time, a fox said: héllo wörld!",
    "日本語のテキストと emoji 🦊🚀 mixed with ASCII",
    "  leading spaces, trailing spaces   and\nnew lines\n",
    "naïve café — déjà vu ✓",
]


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style: multi-byte characters split over several tokens (incomplete UTF-8 in between)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        TEXTS[:1] * 3, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece style: a word's space is part of its token, dropped when the text starts with it."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator(
        TEXTS[:1] * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *byte_tokens])
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("make", [_byte_level, _metaspace], ids=["byte-level", "metaspace"])
@pytest.mark.parametrize("seed", range(4))
def test_increments_add_up_to_the_whole_decode(make, seed):
    tokenizer = make()
    rng = random.Random(seed)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        stream = IncrementalText(tokenizer)
        pieces, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 3])
            piece = stream.push(ids[i : i + n])
            assert "\ufffd" not in piece, "an incomplete character was given out"
            pieces.append(piece)
            i += n
        pieces.append(stream.flush())
        assert "".join(pieces) == whole
        assert whole.strip() and pieces[0] != whole, "the test must stream in more than one piece"


def test_byte_level_splits_characters_over_tokens():
    """The case the hold-back exists for: some token ends inside a character."""
    tokenizer = _byte_level()
    ids = tokenizer("🦊")["input_ids"]
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]).endswith("\ufffd")
    stream = IncrementalText(tokenizer)
    assert stream.push(ids[:1]) == ""
    assert stream.push(ids[1:]) == "🦊"
    assert stream.flush() == ""


def test_flush_gives_out_a_dangling_partial_character():
    tokenizer = _byte_level()
    ids = tokenizer("ok 🦊")["input_ids"][:-1]  # cut inside the fox
    stream = IncrementalText(tokenizer)
    assert stream.push(ids) == ""  # held back: the text ends inside a character
    assert stream.flush() == tokenizer.decode(ids)
    assert stream.flush() == ""


def test_without_tokenizer_there_is_no_text():
    stream = IncrementalText(None)
    assert stream.push([1, 2, 3]) == "" and stream.flush() == ""
