"""Streamed text: token ids arrive a few at a time; the text increments must add up to the full decode."""

from __future__ import annotations

import os

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class IncrementalText:
    """Text increments for a growing list of generated token ids.

    Decoding only the newest tokens can differ from decoding the whole list (a tokenizer may drop a
    word's leading space at the start of a text, or split a character's UTF-8 bytes over tokens).
    So each step decodes a window that starts one chunk back: the window's earlier part gives the
    context, and the increment is what the whole window decodes to beyond that part. Text ending in
    U+FFFD is an incomplete character: held back until a later token completes it, or `flush`.
    The increments concatenate to `tokenizer.decode(all_ids, skip_special_tokens=True)`, the text
    `Engine.result` reports.
    """

    def __init__(self, tokenizer: object | None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # the window's first token
        self._read = 0  # tokens whose text was already given out

    def push(self, token_ids: list[int]) -> str:
        """The text that `token_ids` complete (may be empty)."""
        self._ids.extend(token_ids)
        if self._tokenizer is None:
            return ""
        done = self._decode(self._ids[self._start : self._read])
        window = self._decode(self._ids[self._start :])
        if window.endswith(REPLACEMENT) or not window.startswith(done):
            return ""
        self._start, self._read = self._read, len(self._ids)
        return window[len(done) :]

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included; call once at the end."""
        if self._tokenizer is None or self._read == len(self._ids):
            return ""
        done = self._decode(self._ids[self._start : self._read])
        window = self._decode(self._ids[self._start :])
        self._start = self._read = len(self._ids)
        return window[len(os.path.commonprefix([done, window])) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
