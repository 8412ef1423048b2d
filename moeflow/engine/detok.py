"""Streamed text: token ids arrive a few at a time; the text increments must add up to the full decode.

Also where stop strings end a text (`TextStream`), and the lock that lets several threads decode with one
tokenizer (`LockedTokenizer`)."""

from __future__ import annotations

import os
import threading

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


class LockedTokenizer:
    """Decoding from several threads: transformers' fast tokenizers are not safe to call concurrently, so every
    user of one tokenizer (the engine thread's stop strings, the server's handler threads) holds one lock."""

    def __init__(self, tokenizer: object, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, ids: list[int], **kw: object) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, **kw)


def find_stop(text: str, stop: tuple[str, ...]) -> int:
    """Where the earliest of the `stop` strings begins in `text`, -1 when none occurs."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else -1


class TextStream:
    """The text of a growing list of token ids, given out in increments and cut before the first stop string.

    Increments come from `IncrementalText`; with stop strings the last `len(longest stop) - 1` characters are
    held back, since they may begin a stop string that the next tokens complete. Once a stop string appears,
    the text before it is given out and `stopped` is set; nothing after it ever is. The increments
    concatenate to `cut_text(tokenizer.decode(all_ids, skip_special_tokens=True), stop)`.
    """

    def __init__(self, tokenizer: object | None, stop: tuple[str, ...] = ()) -> None:
        self._text = IncrementalText(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """The text that `token_ids` complete and that cannot be part of a stop string (may be empty)."""
        if self.stopped:
            return ""
        self._pending += self._text.push(token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back, up to a stop string; call once at the end."""
        if self.stopped:
            return ""
        self._pending += self._text.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        at = find_stop(self._pending, self._stop)
        if at >= 0:
            self.stopped = True
            out, self._pending = self._pending[:at], ""
            return out
        keep = 0 if final else min(self._hold, len(self._pending))
        out, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        return out


def cut_text(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first stop string (all of it when none occurs)."""
    at = find_stop(text, stop)
    return text if at < 0 else text[:at]
