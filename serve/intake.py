"""Request admission: a request checked against the server's limits, then taken if there is room.

`RequestLimits` turns a `GenerateRequest` into the engine's `SequenceState` (or says what is wrong with it);
`Intake` is where gRPC handler threads leave work for the engine thread — new requests (within the
server's capacity, refused while draining), cancellations and stats requests — under one lock.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeflow.config import SamplingParams
from moeflow.errors import RequestError

from .config import ServerConfig
from .errors import CapacityError, DrainingError, EngineDead
from .handle import RequestHandle

if TYPE_CHECKING:
    from moeflow.engine import Engine
    from moeflow.engine.batch import SequenceState

    from .stats import ServeStats


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One request as the transport received it; None means "the server's default"."""

    prompt: str
    max_new_tokens: int | None = None
    temperature: float | None = 0.0  # gRPC always sends one (0: greedy); None: the model's default
    top_p: float | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] | None = None
    logprobs: int | None = None


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "logprobs", "seed")


class RequestLimits:
    """What a request may ask of this server: `--max-new-tokens-limit`, `--max-prompt-tokens` (or the context).

    A prompt is never tokenized in full when it cannot fit: no token of the model spans more than
    `max_token_chars` characters, so a prompt longer than that many times the token limit is refused on its
    length alone (a 1 MiB prompt took 1.5 s of the tokenizer, and memory, before it was refused). Prompts that
    may fit are encoded with a copy of the tokenizer under a lock of their own, never the one the streams
    decode with (`Engine.tokenizer_lock`).
    """

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self._engine = engine
        self._max_new_tokens = config.max_new_tokens_limit
        self._max_prompt_tokens = config.max_prompt_tokens or engine.max_context
        self._encoder = copy.deepcopy(engine.tokenizer)
        self._encoder_lock = threading.Lock()
        self._token_chars = max_token_chars(engine.tokenizer) if engine.tokenizer is not None else 0

    def sequence(self, request: GenerateRequest) -> SequenceState:
        """The engine's sequence for `request`; RequestError says what to change when it asks too much."""
        limit = self._max_new_tokens
        max_new = request.max_new_tokens
        if max_new is None:
            max_new = min(SamplingParams.max_new_tokens, limit)
        elif max_new > limit:
            raise RequestError(
                f"max_new_tokens is {max_new}, but this server allows at most {limit} (--max-new-tokens-limit); "
                "ask for fewer tokens"
            )
        sampling = {name: getattr(request, name) for name in SAMPLING_FIELDS}
        seq = self._engine.new_sequence(self._encode(request.prompt), max_new_tokens=max_new, **sampling)
        if self._max_prompt_tokens and len(seq.prompt_ids) > self._max_prompt_tokens:
            raise RequestError(
                f"the prompt is {len(seq.prompt_ids)} tokens, but this server accepts at most "
                f"{self._max_prompt_tokens} (--max-prompt-tokens, or the model's context); shorten the prompt"
            )
        return seq

    def _encode(self, prompt: str) -> str | list[int]:
        """The prompt's token ids (the text itself when it is empty or there is no tokenizer: the engine says why)."""
        if not prompt or self._encoder is None:
            return prompt
        max_chars = self._max_prompt_tokens * self._token_chars
        if self._max_prompt_tokens and len(prompt) > max_chars:
            raise RequestError(
                f"the prompt is {len(prompt)} characters, but this server accepts at most {self._max_prompt_tokens} "
                f"tokens (--max-prompt-tokens, or the model's context) and no token of this model spans more than "
                f"{self._token_chars} characters, so at most {max_chars} characters can fit; shorten the prompt"
            )
        with self._encoder_lock:
            return list(self._encoder(prompt)["input_ids"])


def max_token_chars(tokenizer: object) -> int:
    """The longest text one token of `tokenizer` stands for, in characters (a vocabulary entry is at least as long
    as its text: byte-level entries spell each byte as one character, byte fallback as <0xNN>)."""
    return max((len(entry) for entry in tokenizer.get_vocab()), default=1)


@dataclass(frozen=True)
class Mail:
    """What the handler threads left since the engine thread last looked."""

    requests: list[RequestHandle]
    cancels: list[RequestHandle]
    stats_wanted: list[Future[ServeStats]]
    closing: bool


class Intake:
    """The one lock between handler threads and the engine thread, and the count of requests taken."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._wake = threading.Condition()
        self._requests: list[RequestHandle] = []
        self._cancels: list[RequestHandle] = []
        self._stats_wanted: list[Future[ServeStats]] = []
        self._outstanding = 0  # taken and not yet finished
        self._rejected = 0
        self._draining = False
        self._closing = False
        self._dead: EngineDead | None = None  # set once the engine thread has stopped for good

    # ---- handler threads --------------------------------------------------------------------------

    def admit(self, handle: RequestHandle) -> None:
        """Take the request, or raise CapacityError (every place taken) or DrainingError (shutting down)."""
        with self._wake:
            if self._dead is not None:
                self._rejected += 1
                raise self._dead
            if self._draining:
                self._rejected += 1
                raise DrainingError("the server is shutting down and takes no new requests; retry on another server")
            if self._outstanding >= self._config.capacity:
                self._rejected += 1
                raise CapacityError(
                    f"the server is full: {self._config.max_batch_size} requests decoding and "
                    f"{self._config.max_queue} waiting (--max-batch-size, --max-queue); retry later, or start the "
                    "server with a larger --max-queue or --max-batch-size"
                )
            self._outstanding += 1
            self._requests.append(handle)
            self._wake.notify_all()

    def cancel(self, handle: RequestHandle) -> None:
        with self._wake:
            self._cancels.append(handle)
            self._wake.notify_all()

    def ask_stats(self, future: Future[ServeStats]) -> None:
        with self._wake:
            if self._dead is not None:
                raise self._dead
            self._stats_wanted.append(future)
            self._wake.notify_all()

    def drain(self) -> None:
        """Refuse new requests from now on."""
        with self._wake:
            self._draining = True

    def close(self) -> None:
        """Refuse new requests and tell the engine thread to stop."""
        with self._wake:
            self._draining = True
            self._closing = True
            self._wake.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every taken request has finished; False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: self._outstanding == 0, timeout)

    @property
    def dead(self) -> EngineDead | None:
        with self._wake:
            return self._dead

    @property
    def rejected(self) -> int:
        with self._wake:
            return self._rejected

    @property
    def draining(self) -> bool:
        with self._wake:
            return self._draining

    # ---- the engine thread ------------------------------------------------------------------------

    def take(self, *, wait: bool) -> Mail:
        """Everything left so far; with `wait` (nothing to decode), block until something arrives."""
        with self._wake:
            if wait:
                self._wake.wait_for(lambda: self._requests or self._cancels or self._stats_wanted or self._closing)
            mail = Mail(self._requests, self._cancels, self._stats_wanted, self._closing)
            self._requests, self._cancels, self._stats_wanted = [], [], []
        return mail

    def kill(self, error: EngineDead) -> tuple[list[RequestHandle], list[Future[ServeStats]]]:
        """The engine thread is stopping for good: refuse everything from now on. Returns the requests and
        stats asks it never took (the caller fails them); their places are freed here."""
        with self._wake:
            self._dead = error
            self._draining = True
            orphans, asks = self._requests, self._stats_wanted
            self._requests, self._cancels, self._stats_wanted = [], [], []
            self._outstanding -= len(orphans)
            self._wake.notify_all()
        return orphans, asks

    def finished(self, count: int = 1) -> None:
        """`count` taken requests ended (done, cancelled or failed): their places are free."""
        with self._wake:
            self._outstanding -= count
            self._wake.notify_all()
