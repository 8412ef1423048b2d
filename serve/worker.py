"""The engine thread: the only thread that touches the engine's scheduler.

gRPC handler threads call `submit`, `cancel` and `stats`; these validate, queue work under one lock
and wake the engine thread. Between decode steps the engine thread admits the new requests to the
scheduler, cancels those whose clients left, answers stats requests, runs one step, and pushes each
running sequence's new tokens to its request's event queue. Handlers turn events into `Chunk`s
(text decoding happens on their threads, not the engine's).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace

from moeflow.config import SamplingParams
from moeflow.engine import Engine
from moeflow.engine.batch import Sequence
from moeflow.errors import RequestError
from moeflow.offload.stats import CacheStats
from moeflow.scheduler import AdmissionPolicy, Scheduler

from .config import ServerConfig
from .detok import IncrementalText

log = logging.getLogger(__name__)

TOKENS_PER_S_WINDOW_S = 10.0


class ServeError(Exception):
    """A request the server cannot take or finish, through no fault of the request itself."""


class CapacityError(ServeError):
    """Every running and waiting place is taken."""


class DrainingError(ServeError):
    """The server is shutting down."""


class EngineFailure(ServeError):
    """The engine raised during a decode step; the requests in that batch are lost."""


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One request as the transport received it; None means "the server's default"."""

    prompt: str
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None


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


@dataclass(frozen=True, kw_only=True)
class ServeStats:
    cache: CacheStats
    queue_depth: int
    running: int  # sequences in the current decode step
    pooled: int  # prefilled sequences holding a KV cache (the re-batcher keeps more than a batch)
    max_batch_size: int
    max_queue: int
    batch_size_steps: dict[int, int]  # decode steps run at each batch size
    mean_distinct_experts: float  # per decode step and MoE layer: what the re-batcher lowers
    tokens_per_s: float  # over the last TOKENS_PER_S_WINDOW_S seconds
    generated_tokens: int
    steps: int
    requests_completed: int
    requests_cancelled: int
    requests_rejected: int
    uptime_s: float
    busy_s: float
    admission: str
    model: str
    draining: bool

    @property
    def mean_batch_size(self) -> float:
        steps = sum(self.batch_size_steps.values())
        return sum(b * n for b, n in self.batch_size_steps.items()) / steps if steps else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        used, wasted = self.cache.prefetch_hits, self.cache.wasted_prefetches
        return used / (used + wasted) if used + wasted else 0.0


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


class _LockedTokenizer:
    """Handler threads share the tokenizer; transformers' fast tokenizers are not safe to call concurrently."""

    def __init__(self, tokenizer: object, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, ids: list[int], **kw: object) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, **kw)


class RequestHandle:
    """A submitted request: iterate `chunks()` (or call `result()`) on the handler thread."""

    def __init__(self, seq: Sequence, worker: EngineWorker, tokenizer: object | None) -> None:
        self.seq = seq
        self._worker = worker
        self._events: queue.SimpleQueue[_Tokens | _Done | _Failed] = queue.SimpleQueue()
        self._text = IncrementalText(tokenizer)
        self.sent = 0  # engine thread: tokens of `seq.generated` already pushed

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
        self._worker.cancel(self)


class EngineWorker:
    """Owns the scheduler and the thread that drives it."""

    def __init__(self, engine: Engine, config: ServerConfig, admission: AdmissionPolicy, model: str = "") -> None:
        self.engine = engine
        self.config = config
        self.model = model
        self._admission = admission
        self._scheduler = Scheduler(engine, max_batch_size=config.max_batch_size, admission=admission)
        self._max_prompt_tokens = config.max_prompt_tokens or engine.max_context
        self._tokenizer_lock = threading.Lock()
        self._tokenizer = (
            _LockedTokenizer(engine.tokenizer, self._tokenizer_lock) if engine.tokenizer is not None else None
        )
        # Shared with handler threads, under `_wake`:
        self._wake = threading.Condition()
        self._inbox: list[RequestHandle] = []
        self._cancels: list[RequestHandle] = []
        self._stats_wanted: list[Future[ServeStats]] = []
        self._outstanding = 0  # submitted and not yet finished
        self._rejected = 0
        self._draining = False
        self._closing = False
        # Engine thread only:
        self._live: dict[int, RequestHandle] = {}  # seq_id -> handle, for sequences the scheduler holds
        self._batch_size_steps: Counter[int] = Counter()
        self._distinct_experts_sum = 0.0
        self._distinct_experts_steps = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._generated = 0
        self._completed = 0
        self._cancelled = 0
        self._busy_s = 0.0
        self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="moeflow-engine", daemon=True)
        self._thread.start()

    # ---- called from handler threads --------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Validate and queue; raises RequestError (the request is wrong) or ServeError (the server is busy)."""
        seq = self._new_sequence(request)
        with self._wake:
            if self._draining:
                self._rejected += 1
                raise DrainingError("the server is shutting down and takes no new requests; retry on another server")
            if self._outstanding >= self.config.capacity:
                self._rejected += 1
                raise CapacityError(
                    f"the server is full: {self.config.max_batch_size} requests decoding and {self.config.max_queue} "
                    "waiting (--max-batch-size, --max-queue); retry later, or start the server with a larger "
                    "--max-queue or --max-batch-size"
                )
            handle = RequestHandle(seq, self, self._tokenizer)
            self._outstanding += 1
            self._inbox.append(handle)
            self._wake.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._wake:
            self._cancels.append(handle)
            self._wake.notify_all()

    def stats(self, timeout: float = 30.0) -> ServeStats:
        """A snapshot taken by the engine thread at its next step boundary."""
        future: Future[ServeStats] = Future()
        with self._wake:
            self._stats_wanted.append(future)
            self._wake.notify_all()
        return future.result(timeout)

    def drain(self) -> None:
        """Refuse new requests from now on; the ones already taken run to the end."""
        with self._wake:
            self._draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every taken request has finished; False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self) -> None:
        """Stop the engine thread; requests still running fail with DrainingError, new ones are refused."""
        with self._wake:
            self._draining = True
            self._closing = True
            self._wake.notify_all()
        self._thread.join()

    def _new_sequence(self, request: GenerateRequest) -> Sequence:
        limit = self.config.max_new_tokens_limit
        max_new = request.max_new_tokens
        if max_new is None:
            max_new = min(SamplingParams.max_new_tokens, limit)
        elif max_new > limit:
            raise RequestError(
                f"max_new_tokens is {max_new}, but this server allows at most {limit} (--max-new-tokens-limit); "
                "ask for fewer tokens"
            )
        sampling = {"top_p": request.top_p, "seed": request.seed}
        with self._tokenizer_lock:
            seq = self.engine.new_sequence(
                request.prompt,
                max_new_tokens=max_new,
                temperature=request.temperature,
                **{k: v for k, v in sampling.items() if v is not None},
            )
        if self._max_prompt_tokens and len(seq.prompt_ids) > self._max_prompt_tokens:
            raise RequestError(
                f"the prompt is {len(seq.prompt_ids)} tokens, but this server accepts at most "
                f"{self._max_prompt_tokens} (--max-prompt-tokens, or the model's context); shorten the prompt"
            )
        return seq

    # ---- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(
                    lambda: (
                        self._inbox or self._cancels or self._stats_wanted or self._closing or not self._scheduler.idle
                    )
                )
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                stats_wanted, self._stats_wanted = self._stats_wanted, []
                closing = self._closing
            for handle in inbox:
                self._scheduler.submit(handle.seq)
                self._live[handle.seq.seq_id] = handle
            for handle in cancels:
                if self._live.pop(handle.seq.seq_id, None) is not None:
                    self._scheduler.cancel(handle.seq)
                    self._finish(handle)
            if stats_wanted:
                snapshot = self._snapshot()
                for future in stats_wanted:
                    future.set_result(snapshot)
            if closing:
                self._fail_all(DrainingError("the server stopped before this request finished; send it again"))
                return
            if not self._scheduler.idle:
                self._step()

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            finished = self._scheduler.step()
        except Exception as e:  # an engine bug must not leave every client waiting forever
            log.exception("decode step failed")
            self._fail_all(EngineFailure(f"the engine failed during a decode step ({e!r}); see the server log"))
            self._scheduler = Scheduler(
                self.engine, max_batch_size=self.config.max_batch_size, admission=self._admission
            )
            return
        now = time.perf_counter()
        self._busy_s += now - t0
        # The scheduler's per-step lists grow forever; the server keeps a histogram and a running sum.
        self._batch_size_steps.update(self._scheduler.batch_sizes)
        self._scheduler.batch_sizes.clear()
        self._distinct_experts_sum += sum(self._scheduler.distinct_experts)
        self._distinct_experts_steps += len(self._scheduler.distinct_experts)
        self._scheduler.distinct_experts.clear()
        # Every live request, not only this step's batch: a prefill (first token) can happen without a decode.
        new_tokens = sum(self._publish(handle) for handle in self._live.values())
        for seq in finished:
            self._finish(self._live.pop(seq.seq_id))
        self._generated += new_tokens
        self._recent_tokens.append((now, new_tokens))
        while self._recent_tokens[0][0] < now - TOKENS_PER_S_WINDOW_S:
            self._recent_tokens.popleft()

    def _publish(self, handle: RequestHandle) -> int:
        new = handle.seq.generated[handle.sent :]
        if new:
            handle.sent += len(new)
            handle._events.put(_Tokens(tuple(new)))
        return len(new)

    def _finish(self, handle: RequestHandle) -> None:
        seq = handle.seq
        if seq.finish_reason == "cancelled":
            self._cancelled += 1
        else:
            self._completed += 1
        end = seq.t_done if seq.t_done is not None else time.perf_counter()
        first = seq.t_first_token if seq.t_first_token is not None else end
        handle._events.put(
            _Done(
                finish_reason=seq.finish_reason or "cancelled",
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=handle.sent,
                time_to_first_token_s=first - seq.t_submit,
                elapsed_s=end - seq.t_submit,
            )
        )
        with self._wake:
            self._outstanding -= 1
            self._wake.notify_all()

    def _fail_all(self, error: ServeError) -> None:
        for handle in self._live.values():
            handle._events.put(_Failed(error))
        with self._wake:
            self._outstanding -= len(self._live)
            self._wake.notify_all()
        self._live.clear()

    def _snapshot(self) -> ServeStats:
        now = time.perf_counter()
        recent = [n for t, n in self._recent_tokens if t >= now - TOKENS_PER_S_WINDOW_S]
        window = min(TOKENS_PER_S_WINDOW_S, now - self._t_start)
        with self._wake:
            rejected, draining = self._rejected, self._draining
        return ServeStats(
            cache=self.engine.stats(),
            queue_depth=len(self._scheduler.waiting),
            running=len(self._scheduler.batch.members),
            pooled=len(self._scheduler.active),
            max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            batch_size_steps=dict(self._batch_size_steps),
            mean_distinct_experts=self._distinct_experts_sum / max(self._distinct_experts_steps, 1),
            tokens_per_s=sum(recent) / window if window > 0 else 0.0,
            generated_tokens=self._generated,
            steps=sum(self._batch_size_steps.values()),
            requests_completed=self._completed,
            requests_cancelled=self._cancelled,
            requests_rejected=rejected,
            uptime_s=now - self._t_start,
            busy_s=self._busy_s,
            admission=self._admission.name,
            model=self.model,
            draining=draining,
        )
