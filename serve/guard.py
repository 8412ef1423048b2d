"""Handler threads: no client can hold them all. Generation and control calls have separate limits and pools,
and a call that does not send its request message in time is cancelled.

gRPC's Python server reads a unary request on a handler thread, so a call that sends its headers and never
its message holds that thread until the client leaves; with one global limit, 144 such calls (the default
limit then) refused health checks, GetStats and generation alike for as long as the client liked. Here
`CallGuard` (a server interceptor, run on gRPC's polling thread as a call arrives):

- counts calls in two classes: *generation* (Generate, GenerateUnary) and *control* (health, GetStats,
  reflection). Each class has its own limit, and control calls run on their own thread pool, so health and
  stats answer while every generation thread is taken. A call over its class's limit is refused at once with
  RESOURCE_EXHAUSTED, on a third small pool, without reading its message;
- reads every request message itself (the method is served as request-streaming, which the wire does not
  see), under a deadline: a message that has not arrived `idle_timeout_s` after the call started (or after
  the previous message of a stream) cancels the call, freeing its thread;
- parses the messages itself, so bytes that are not the method's message get one INVALID_ARGUMENT. (When
  gRPC parsed them, it answered INTERNAL itself, and the handler's answer to the missing message became a
  second status on a finished call, whose completion never came: every such call kept its state for good,
  measured as the soak's steady RSS growth.)
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from .config import authorized
from .proto import SERVICE_NAME

GENERATION_METHODS = frozenset({f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateUnary"})
OPEN_PREFIX = "/grpc.health.v1.Health/"  # health checks need no token (probes rarely carry one; they reveal one word)
CONTROL_THREADS = 8  # health checks, GetStats and reflection at once
REFUSAL_THREADS = 2  # refusals never read a message: they take no time


class IdleWatch:
    """One thread that cancels the calls whose next request message is late."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._waiting: dict[int, grpc.ServicerContext] = {}
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moeflow-idle-watch", daemon=True)
        self._thread.start()

    def read(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The next message of `requests`, or None when the client sent no more. The call is cancelled (and
        gRPC's RpcError raised here, which gRPC then ignores) if the message is later than the timeout."""
        token = next(self._ids)
        with self._cv:
            self._waiting[token] = context
            heapq.heappush(self._heap, (time.monotonic() + self.timeout_s, token))
            self._cv.notify()
        try:
            return next(requests, None)
        finally:
            with self._cv:
                self._waiting.pop(token, None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._waiting):
                    _, token = heapq.heappop(self._heap)
                    context = self._waiting.pop(token, None)
                    if context is not None:
                        context.cancel()  # wakes the handler thread blocked on the message
                self._cv.wait(self._heap[0][0] - now if self._heap else None)


class CallGuard(grpc.ServerInterceptor):
    def __init__(
        self, *, generation_limit: int, control_limit: int, idle_timeout_s: float, token: str | None = None
    ) -> None:
        self._token = token
        self._limits = {"generation": generation_limit, "control": control_limit}
        self._active = {"generation": 0, "control": 0}
        self._lock = threading.Lock()
        self._watch = IdleWatch(idle_timeout_s)
        self.control_pool = ThreadPoolExecutor(max_workers=control_limit, thread_name_prefix="moeflow-control")
        self._refusal_pool = ThreadPoolExecutor(max_workers=REFUSAL_THREADS, thread_name_prefix="moeflow-refuse")

    def active(self, kind: str) -> int:
        with self._lock:
            return self._active[kind]

    def close(self) -> None:
        self._watch.close()
        self.control_pool.shutdown(wait=False)
        self._refusal_pool.shutdown(wait=False)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        if self._token is not None and not details.method.startswith(OPEN_PREFIX):
            sent = next((v for k, v in details.invocation_metadata if k == "authorization"), "")
            if not authorized(str(sent).encode(), self._token):
                return self._refusal(
                    handler,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server needs a bearer token: send metadata 'authorization: Bearer TOKEN' "
                    "(moeflow client --token-file)",
                )
        kind = "generation" if details.method in GENERATION_METHODS else "control"
        with self._lock:
            if self._active[kind] >= self._limits[kind]:
                return self._over_limit(handler, kind)
            self._active[kind] += 1
        return self._guarded(handler, kind)

    # ---- handlers -------------------------------------------------------------------------------------

    def _done(self, kind: str) -> None:
        with self._lock:
            self._active[kind] -= 1

    def _guarded(self, handler: grpc.RpcMethodHandler, kind: str) -> grpc.RpcMethodHandler:
        """`handler` served as request-streaming: this class reads the messages, each under the idle deadline."""
        watch = self._watch
        done = self._done
        streaming_request = handler.request_streaming
        inner = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
        parse = handler.request_deserializer or (lambda raw: raw)

        def behavior(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            if not context.add_callback(lambda: done(kind)):  # the call already ended
                done(kind)
            if streaming_request:
                return inner(_each(watch, requests, context, parse), context)
            raw = watch.read(requests, context)
            if raw is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this method takes exactly one request message")
            return inner(_parsed(parse, raw, context), context)

        if kind == "control":
            behavior.experimental_thread_pool = self.control_pool  # gRPC runs it there, not on the shared pool
        return _streaming_request(handler, behavior)

    def _over_limit(self, handler: grpc.RpcMethodHandler, kind: str) -> grpc.RpcMethodHandler:
        limit = self._limits[kind]
        what = "generation requests" if kind == "generation" else "health, stats and reflection calls"
        message = f"the server is handling {limit} {what} at once, its limit; retry later" + (
            " (or start it with a larger --max-queue)" if kind == "generation" else ""
        )
        return self._refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _refusal(self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        """Answers `code` at once, on the refusal pool, without reading the request."""

        def refuse(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        refuse.experimental_thread_pool = self._refusal_pool
        return _streaming_request(handler, refuse)


def _each(
    watch: IdleWatch, requests: Iterator[bytes], context: grpc.ServicerContext, parse: Callable[[bytes], Any]
) -> Iterator[Any]:
    while (raw := watch.read(requests, context)) is not None:
        yield _parsed(parse, raw, context)


def _parsed(parse: Callable[[bytes], Any], raw: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return parse(raw)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError, a custom deserializer anything
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request message ({len(raw)} bytes) could not be parsed: corrupt, or not this method's message type",
        )


def _streaming_request(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler for `handler`'s method that takes the request messages, unparsed, as an iterator (the wire is
    the same)."""
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, None, handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(behavior, None, handler.response_serializer)
