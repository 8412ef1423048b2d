"""Calls that send their headers and never their message cannot lock anyone out (serve/guard.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from moeflow.serve.client import MoeflowClient
from moeflow.serve.config import ServerConfig
from moeflow.serve.guard import CONTROL_THREADS
from moeflow.serve.proto import SERVICE_NAME
from test_serve import serving  # a server on a free loopback port over a fresh engine at 25%

from moeflow.errors import MoeflowError

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict) -> Path:
    return tiny_checkpoints["mixtral"]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@contextmanager
def silent_calls(address: str, methods: list[str]) -> Iterator[list[grpc.Future]]:
    """One call per method name, each sending its headers and then nothing (its request iterator blocks)."""
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait()
        return
        yield

    with grpc.insecure_channel(address) as channel:
        calls = []
        for method in methods:
            if method == f"/{SERVICE_NAME}/Generate":
                call = channel.stream_stream(method)(nothing(), timeout=60)
            else:
                call = channel.stream_unary(method).future(nothing(), timeout=60)
            calls.append(call)
        try:
            yield calls
        finally:
            release.set()
            for call in calls:
                call.cancel()


def _code(call: grpc.Future) -> grpc.StatusCode:
    try:
        call.result() if hasattr(call, "result") else list(call)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_silent_generation_calls_leave_health_and_stats_answering(checkpoint):
    """The issue's attack: 144 header-only Generate/GenerateUnary calls took every handler slot, and health,
    GetStats and Generate all got RESOURCE_EXHAUSTED for as long as they were held. Now health and stats
    answer throughout, and the idle deadline frees the generation threads."""
    methods = [f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GenerateUnary"] * 72
    with serving(checkpoint, max_batch_size=1, max_queue=2, idle_timeout_s=5.0) as running:
        with silent_calls(running.address, methods) as calls, MoeflowClient(running.address, timeout=5) as c:
            held = 3 + 8  # capacity + spare
            _wait_for(lambda: running.guard.active("generation") == held, "silent calls to hold every place")
            with pytest.raises(grpc.RpcError) as e:  # every generation place is held: refused at once, not queued
                c.generate("abc", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in e.value.details()
            t0 = time.monotonic()
            assert c.health() == "SERVING"
            assert c.health(SERVICE_NAME) == "SERVING"
            assert c.stats()["requests_completed"] == 0
            assert time.monotonic() - t0 < 3.0, "health and stats waited for generation threads"
            codes = [_code(call) for call in calls]
            assert time.monotonic() - t0 < 20, "the silent calls were not cut at their idle deadline"
            assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert codes.count(grpc.StatusCode.CANCELLED) >= held, "the calls holding places were cut"
            assert len(c.generate("abc", max_new_tokens=3).token_ids) == 3


def test_silent_health_checks_are_cut_at_the_idle_deadline(checkpoint):
    with serving(checkpoint, idle_timeout_s=3.0) as running:
        with silent_calls(running.address, [HEALTH_CHECK] * 20) as calls, MoeflowClient(running.address) as c:
            _wait_for(lambda: running.guard.active("control") == CONTROL_THREADS, "silent checks to hold the pool")
            codes = [_code(call) for call in calls]
            assert set(codes) == {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert codes.count(grpc.StatusCode.CANCELLED) >= CONTROL_THREADS
            assert c.health(timeout=5) == "SERVING"
            assert len(c.generate("abc", max_new_tokens=2, timeout=30).token_ids) == 2


def test_a_unary_call_without_its_message_is_refused(checkpoint):
    with serving(checkpoint) as running, grpc.insecure_channel(running.address) as channel:
        call = channel.stream_unary(f"/{SERVICE_NAME}/GenerateUnary")
        with pytest.raises(grpc.RpcError) as e:
            call(iter([]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one request message" in e.value.details()
        check = channel.stream_unary(HEALTH_CHECK, response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert check(iter([health_pb2.HealthCheckRequest().SerializeToString()]), timeout=10).status == 1  # SERVING


def test_idle_timeout_must_be_positive():
    with pytest.raises(MoeflowError, match="--idle-timeout-s must be > 0"):
        ServerConfig(idle_timeout_s=0)


def test_a_huge_prompt_is_refused_on_its_length_before_it_is_tokenized(checkpoint):
    """A 1 MiB prompt used to be tokenized in full (1.5 s of the tokenizer here, under the lock the streams decode
    with) before its length was checked. No token of the model spans more than a few characters, so its length in
    characters alone says it cannot fit: refused at once, naming the limit, while another stream goes on."""
    with serving(checkpoint, max_message_bytes=2 << 20) as running, MoeflowClient(running.address, timeout=60) as c:
        stream = iter(c.stream("Once upon a time", max_new_tokens=120))
        first = next(stream)
        t0 = time.monotonic()
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as e:
                c.generate("x" * (1 << 20), max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = e.value.details()
            assert "the prompt is 1048576 characters" in details and "at most 256 tokens" in details
            assert "--max-prompt-tokens" in details
        assert time.monotonic() - t0 < 4.0, "the huge prompts were tokenized (4 x 1.5 s here before)"
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 120
        # A prompt that may fit is still measured in tokens.
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x" * 300, max_new_tokens=2)
        assert "prompt is 300 tokens and max_new_tokens is 2, but the model's context is 256" in e.value.details()
