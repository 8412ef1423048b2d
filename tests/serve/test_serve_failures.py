"""One request's failure, or the engine's, on a real server: the others go on, or everyone learns at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from moeflow.serve.client import MoeflowClient
from test_serve import serving  # a server on a free loopback port over a fresh engine at 25%
from test_serve_guard import _wait_for

import moeflow
import moeflow.engine.batch

LONG_PROMPT = "Once upon a time"  # its greedy continuation never meets EOS within 240 tokens (test_serve.py)
OTHERS = [("The quick brown fox jumps", 30), ("abc", 40)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict) -> Path:
    return tiny_checkpoints["mixtral"]


@pytest.fixture(scope="module")
def solo(checkpoint: Path) -> dict[tuple[str, int], list[int]]:
    with moeflow.load(checkpoint) as engine:
        return {(p, n): engine.generate(p, max_new_tokens=n).token_ids for p, n in [*OTHERS, (LONG_PROMPT, 24)]}


def _together(address: str, calls: list[Callable[[MoeflowClient], object]]) -> list[object]:
    """Run each call on its own client at the same moment; each result is its return value or its RpcError."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def one(i: int) -> None:
        with MoeflowClient(address, timeout=120) as c:
            barrier.wait()
            try:
                results[i] = calls[i](c)
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def _ids(replies: object) -> list[int]:
    assert not isinstance(replies, grpc.RpcError), f"{replies.code()}: {replies.details()}"
    return [t for r in replies for t in r.token_ids]


# ---- one request fails: only it ------------------------------------------------------------------------------


def test_tiny_temperature_is_near_greedy_and_fails_nobody(checkpoint, solo):
    """temperature=1e-40 is inside [0, 100]: logits / 1e-40 overflow float32, and sampling used to raise for the
    whole batch (every stream in it got INTERNAL). Now it samples from the limit distribution, the argmax."""
    with serving(checkpoint, max_batch_size=3) as running:
        results = _together(
            running.address,
            [
                *[lambda c, p=p, n=n: list(c.stream(p, max_new_tokens=n)) for p, n in OTHERS],
                lambda c: list(c.stream(LONG_PROMPT, max_new_tokens=24, temperature=1e-40, seed=3)),
            ],
        )
        for (p, n), replies in zip(OTHERS, results):
            assert _ids(replies) == solo[(p, n)]
        assert _ids(results[-1]) == solo[(LONG_PROMPT, 24)]
        with MoeflowClient(running.address) as c:
            assert c.health() == "SERVING"
            assert sum(c.stats()["batch_size_steps"].get(b, 0) for b in (2, 3)) > 0, "never decoded together"


@pytest.mark.parametrize("at_token", [0, 3], ids=["in-prefill", "in-decode"])
def test_a_request_whose_sampling_raises_fails_alone(checkpoint, solo, monkeypatch, at_token):
    """Any exception raised for one request (here: its sampling, on its first or fourth token) fails that request
    with INTERNAL and a message; the streams decoding in the same batch finish with their exact tokens."""
    real = moeflow.engine.batch.sample_next
    calls = []

    def sample_next(logits_V, params, *rest):
        if params.seed == 13:
            calls.append(1)
            if len(calls) > at_token:
                raise FloatingPointError("injected sampling fault")
        return real(logits_V, params, *rest)

    monkeypatch.setattr(moeflow.engine.batch, "sample_next", sample_next)
    with serving(checkpoint, max_batch_size=3) as running:
        results = _together(
            running.address,
            [
                *[lambda c, p=p, n=n: list(c.stream(p, max_new_tokens=n)) for p, n in OTHERS],
                lambda c: list(c.stream(LONG_PROMPT, max_new_tokens=24, temperature=0.7, seed=13)),
            ],
        )
        for (p, n), replies in zip(OTHERS, results):
            assert _ids(replies) == solo[(p, n)]
        failed = results[-1]
        assert isinstance(failed, grpc.RpcError) and failed.code() == grpc.StatusCode.INTERNAL
        assert "the engine failed on this request" in failed.details() and "injected sampling fault" in failed.details()
        with MoeflowClient(running.address, timeout=60) as c:
            assert c.health() == "SERVING"
            assert list(c.generate("abc", max_new_tokens=40).token_ids) == solo[("abc", 40)]
            _wait_for(lambda: c.stats()["running"] == 0, "the failed request's place to be freed")
            assert c.stats()["requests_failed"] == 1


# ---- the engine thread dies: everyone learns at once ----------------------------------------------------------


def test_dead_engine_fails_everyone_fast_and_health_says_so(checkpoint):
    """An exception escaping the engine thread's loop used to end the thread silently: streams and queued requests
    waited forever and health said SERVING. Now: NOT_SERVING, every request fails with UNAVAILABLE at once, new
    ones too, and shutdown returns."""
    with serving(checkpoint, max_batch_size=1, max_queue=4) as running:
        with MoeflowClient(running.address, timeout=30) as c:
            running_stream = iter(c.stream(LONG_PROMPT, max_new_tokens=240))
            next(running_stream)
            queued = c.stream("abc", max_new_tokens=5)
            _wait_for(lambda: c.stats()["queue_depth"] == 1, "the second request to wait")

            def broken_step(*_: object, **__: object) -> None:
                raise MemoryError("injected: the engine thread cannot go on")

            running.worker._stats.step = broken_step  # the next step's bookkeeping kills the thread
            t0 = time.monotonic()
            for call in (lambda: list(running_stream), lambda: list(queued)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "the engine stopped (MemoryError" in e.value.details()
            assert time.monotonic() - t0 < 10, "the waiting requests were not failed at once"
            _wait_for(lambda: c.health() == "NOT_SERVING", "health to report the dead engine", timeout=5)
            for call in (lambda: c.generate("abc", max_new_tokens=2), c.stats):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "cannot serve until it is restarted" in e.value.details()
        t0 = time.monotonic()
        assert running.shutdown(grace_s=30.0)
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_an_engine_whose_every_forward_fails_is_declared_dead(checkpoint, monkeypatch, kind):
    """A fault the engine cannot get past (here every decode forward, or every prompt's prefill, raises, as when
    the expert store is gone) failed each request with INTERNAL while health said SERVING forever. After
    MAX_FAILED_STEPS such forwards in a row the engine is declared dead: NOT_SERVING, and requests fail at once
    with UNAVAILABLE."""
    from moeflow.serve.worker import MAX_FAILED_STEPS

    with serving(checkpoint, max_batch_size=1) as running:
        driver = running.worker.engine.driver
        real = driver.forward

        def forward(input_ids_BT, **kw):
            if kw.get("use_cache", False) == (kind == "prefill"):  # a prefill asks for a new cache
                raise OSError("injected: the expert store is gone")
            return real(input_ids_BT, **kw)

        monkeypatch.setattr(driver, "forward", forward)
        with MoeflowClient(running.address, timeout=30) as c:
            for _ in range(MAX_FAILED_STEPS - 1):
                with pytest.raises(grpc.RpcError) as e:
                    c.generate("abc", max_new_tokens=5)
                assert e.value.code() == grpc.StatusCode.INTERNAL and "the expert store is gone" in e.value.details()
                assert c.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.generate("abc", max_new_tokens=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"the last {MAX_FAILED_STEPS} {kind} forwards failed" in e.value.details()
            _wait_for(lambda: c.health() == "NOT_SERVING", "health to report the dead engine", timeout=5)
            with pytest.raises(grpc.RpcError) as e:
                c.generate("abc", max_new_tokens=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
