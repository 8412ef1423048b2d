"""One request's way back: the engine thread pushes events, the handler thread turns them into `Chunk`s.

Text decoding happens on the handler's thread, never the engine's.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moeflow.engine.detok import LockedTokenizer, TextStream

from .errors import ServeError

if TYPE_CHECKING:
    from moeflow.engine.batch import SequenceState


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """New output of one request; the last chunk of a request has `finish_reason` and the usage."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str = ""  # "" until the last chunk, then "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    elapsed_s: float = 0.0


# ---- events from the engine thread to one request's handler ----------------------------------------


@dataclass(frozen=True)
class _Tokens:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class _Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    elapsed_s: float


@dataclass(frozen=True)
class _Failed:
    error: ServeError


class RequestHandle:
    """A submitted request: iterate `chunks()` (or call `result()`) on the handler thread.

    `publish`, `finish` and `fail` are the engine thread's side.
    """

    def __init__(
        self, seq: SequenceState, tokenizer: LockedTokenizer | None, on_cancel: Callable[[RequestHandle], None]
    ) -> None:
        self.seq = seq
        self._on_cancel = on_cancel
        self._events: queue.SimpleQueue[_Tokens | _Done | _Failed] = queue.SimpleQueue()
        self._text = TextStream(tokenizer, seq.params.stop)  # cut before a stop string, as the engine cuts it
        self._sent = 0  # engine thread: tokens of `seq.generated` already pushed

    # ---- the handler thread ------------------------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        """Blocks until tokens arrive; events that piled up while the consumer was busy go out as one chunk."""
        while True:
            events = [self._events.get()]
            while True:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            ids: list[int] = []
            done: _Done | None = None
            for event in events:
                if isinstance(event, _Failed):
                    raise event.error
                if isinstance(event, _Tokens):
                    ids.extend(event.ids)
                else:
                    done = event
            text = self._text.push(ids)
            if done is None:
                yield Chunk(text=text, token_ids=tuple(ids))
                continue
            yield Chunk(
                text=text + self._text.flush(),
                token_ids=tuple(ids),
                finish_reason=done.finish_reason,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                time_to_first_token_s=done.time_to_first_token_s,
                elapsed_s=done.elapsed_s,
            )
            return

    def result(self) -> Chunk:
        """The whole output as one chunk."""
        text: list[str] = []
        ids: list[int] = []
        for chunk in self.chunks():
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
        return replace(chunk, text="".join(text), token_ids=tuple(ids))  # the last chunk carries the usage

    def cancel(self) -> None:
        """Free the request's place now (no-op once it finished). Safe from any thread, any number of times."""
        self._on_cancel(self)

    # ---- the engine thread -------------------------------------------------------------------------

    def publish(self) -> int:
        """Push the tokens generated since the last call; returns how many."""
        new = self.seq.generated[self._sent :]
        if new:
            self._sent += len(new)
            self._events.put(_Tokens(tuple(new)))
        return len(new)

    def finish(self) -> None:
        """The last event: finish reason and usage (a sequence the scheduler dropped counts as cancelled)."""
        seq = self.seq
        end = seq.t_done if seq.t_done is not None else time.perf_counter()
        first = seq.t_first_token if seq.t_first_token is not None else end
        self._events.put(
            _Done(
                finish_reason=seq.finish_reason or "cancelled",
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=self._sent,
                time_to_first_token_s=first - seq.t_submit,
                elapsed_s=end - seq.t_submit,
            )
        )

    def fail(self, error: ServeError) -> None:
        """The request is lost: its handler raises `error`."""
        self._events.put(_Failed(error))
