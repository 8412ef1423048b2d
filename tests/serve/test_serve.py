"""gRPC serving: a real server on 127.0.0.1, real gRPC clients (ours, generic stubs, health, reflection)."""

from __future__ import annotations

import gc
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from moeflow.serve.client import MoeflowClient, Response
from moeflow.serve.config import ServerConfig
from moeflow.serve.proto import SERVICE_NAME, moeflow_pb2
from moeflow.serve.server import RunningServer, start

import moeflow
from moeflow.errors import MoeflowError

# Greedy continuations of these prompts on the tiny Mixtral never meet EOS within 240 tokens ("a" stops
# after 2 tokens), so a long request is still running when the test acts on it.
LONG_PROMPT = "Once upon a time"
STOPPING_PROMPT = "a"
PROMPTS = [
    ("Once upon a time", 12),
    ("The quick brown fox jumps", 30),
    ("Hello, world!", 5),
    ("abc", 40),
    ("MoE layers route tokens", 17),
    ("1 2 3 4 5", 1),
    ("zzz", 25),
    (STOPPING_PROMPT, 20),
]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict) -> Path:
    return tiny_checkpoints["mixtral"]


@contextmanager
def serving(checkpoint: Path, **config: object) -> Iterator[RunningServer]:
    """A server on a free port of 127.0.0.1 over a fresh engine (a quarter of the experts resident)."""
    engine = moeflow.load(checkpoint, expert_budget="25%")
    running = start(engine, ServerConfig(port=0, **config), model_name="tiny-mixtral")
    try:
        yield running
    finally:
        running.shutdown(grace_s=5.0)
        engine.close()


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[RunningServer]:
    with serving(
        checkpoint,
        max_batch_size=3,
        max_queue=16,
        max_prompt_tokens=64,
        max_new_tokens_limit=240,
        max_message_bytes=64 * 1024,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def solo(checkpoint: Path) -> dict[tuple[str, int], moeflow.GenerationResult]:
    """What `moeflow generate` prints for each prompt: one engine with the CLI's defaults, one request at a time."""
    with moeflow.load(checkpoint) as engine:
        return {(p, n): engine.generate(p, max_new_tokens=n) for p, n in PROMPTS}


@pytest.fixture
def client(server: RunningServer) -> Iterator[MoeflowClient]:
    with MoeflowClient(server.address, timeout=60) as c:
        yield c


def _joined(replies: list[Response]) -> tuple[str, list[int]]:
    return "".join(r.text for r in replies), [t for r in replies for t in r.token_ids]


def _solo_ids(checkpoint: Path, prompt: str, n: int) -> list[int]:
    with moeflow.load(checkpoint) as engine:
        return engine.generate(prompt, max_new_tokens=n).token_ids


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# ---- streaming and exactness ---------------------------------------------------------------------------------


def test_stream_equals_solo_generate(client, solo):
    prompt, n = PROMPTS[1]
    replies = list(client.stream(prompt, max_new_tokens=n))
    text, ids = _joined(replies)
    want = solo[(prompt, n)]
    assert ids == want.token_ids and text == want.text
    assert len(replies) > 1, "tokens must stream as they are produced, not arrive in one message"
    assert all(r.finish_reason == "" for r in replies[:-1])
    last = replies[-1]
    assert last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (len(want.prompt_token_ids), n)
    assert 0 < last.time_to_first_token_s <= last.elapsed_s


def test_unary_equals_stream_and_reports_stop(client, solo):
    prompt, n = PROMPTS[-1]
    reply = client.generate(prompt, max_new_tokens=n)
    want = solo[(prompt, n)]
    assert list(reply.token_ids) == want.token_ids and reply.text == want.text
    assert reply.finish_reason == "stop" and reply.completion_tokens == len(want.token_ids) < n


def test_concurrent_greedy_requests_each_equal_solo(server, solo):
    """More requests than batch places, streamed and unary, all at once: each gets exactly its solo tokens."""
    barrier = threading.Barrier(len(PROMPTS))
    results: dict[int, tuple[str, list[int], str]] = {}

    def one(i: int, prompt: str, n: int) -> None:
        with MoeflowClient(server.address, timeout=120) as c:
            barrier.wait()
            if i % 2:
                reply = c.generate(prompt, max_new_tokens=n)
                results[i] = (reply.text, list(reply.token_ids), reply.finish_reason)
            else:
                replies = list(c.stream(prompt, max_new_tokens=n))
                results[i] = (*_joined(replies), replies[-1].finish_reason)

    with MoeflowClient(server.address) as c:
        before = c.stats()
    threads = [threading.Thread(target=one, args=(i, p, n)) for i, (p, n) in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == len(PROMPTS), "a request was lost"
    for i, (p, n) in enumerate(PROMPTS):
        want = solo[(p, n)]
        assert results[i] == (want.text, want.token_ids, want.finish_reason), f"request {i} ({p!r}) differs from solo"
    with MoeflowClient(server.address) as c:
        after = c.stats()
    steps = {int(b): after["batch_size_steps"].get(b, 0) - before["batch_size_steps"].get(b, 0) for b in (1, 2, 3)}
    assert steps[2] + steps[3] > 0, f"the requests never decoded together: {steps}"
    assert max(int(b) for b in after["batch_size_steps"]) <= 3


def test_seeded_sampling_is_reproducible(client):
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=7)
    first = client.generate("Hello, world!", **kw)
    assert client.generate("Hello, world!", **kw).token_ids == first.token_ids
    assert len(first.token_ids) == 15


# ---- health, reflection, stats -------------------------------------------------------------------------------


def test_health_serving(server, client):
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"moeflow.v1.Moeflow", "grpc.health.v1.Health"} <= services
        # What grpcurl does next: fetch the file that defines the request type and read its fields.
        fd = db.FindFileContainingSymbol("moeflow.v1.GenerateRequest")
    request = next(m for m in fd.message_type if m.name == "GenerateRequest")
    assert [(f.name, f.number) for f in request.field] == [
        ("prompt", 1),
        ("max_new_tokens", 2),
        ("temperature", 3),
        ("top_p", 4),
        ("seed", 5),
    ]
    service = next(s for s in fd.service if s.name == "Moeflow")
    assert {m.name for m in service.method} == {"Generate", "GenerateUnary", "GetStats"}


def test_stats_report_cache_queue_batches_and_throughput(server, client):
    before = client.stats()
    client.generate("zzz", max_new_tokens=10)
    stats = client.stats()
    json.dumps(stats)  # JSON-able as it is
    json_format.MessageToDict(moeflow_pb2.StatsResponse(cache_hit_rate=stats["cache_hit_rate"]))
    assert stats["generated_tokens"] - before["generated_tokens"] == 10
    assert stats["requests_completed"] - before["requests_completed"] == 1
    assert sum(stats["batch_size_steps"].values()) == stats["steps"]
    assert stats["queue_depth"] == 0 and stats["running"] == 0 and stats["pooled"] == 0
    assert 2 <= stats["mean_distinct_experts"] <= 6, "top-2 of 8 experts, at most 3 sequences per step"
    assert stats["max_batch_size"] == 3 and stats["max_queue"] == 16
    assert stats["admission"] == "fifo" and stats["model"] == "tiny-mixtral" and not stats["draining"]
    assert [layer["layer"] for layer in stats["layers"]] == [0, 1]
    hits = sum(layer["hits"] for layer in stats["layers"])
    misses = sum(layer["misses"] for layer in stats["layers"])
    assert misses > 0, "a quarter of the experts resident must miss sometimes"
    assert math.isclose(stats["cache_hit_rate"], hits / (hits + misses))
    for layer in stats["layers"]:
        assert math.isclose(layer["hit_rate"], layer["hits"] / (layer["hits"] + layer["misses"]))
    assert stats["tokens_per_s"] > 0 and stats["busy_s"] > 0 and stats["bytes_read"] > 0
    assert 1 <= stats["mean_batch_size"] <= 3
    assert stats["expert_budget_bytes"] > 0


# ---- malformed requests -------------------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "request_kw, code, says",
    [
        (dict(prompt=""), INVALID, "prompt is empty"),
        (dict(prompt="hi", max_new_tokens=0), INVALID, "max_new_tokens must be at least 1"),
        (dict(prompt="hi", max_new_tokens=-5), INVALID, "max_new_tokens must be at least 1"),
        (dict(prompt="hi", max_new_tokens=2**31 - 1), INVALID, "--max-new-tokens-limit"),
        (dict(prompt="hi", temperature=-0.5), INVALID, "temperature must be in [0, 100]"),
        (dict(prompt="hi", temperature=1000.0), INVALID, "temperature must be in [0, 100]"),
        (dict(prompt="hi", temperature=math.nan), INVALID, "temperature must be a finite number"),
        (dict(prompt="hi", top_p=0.0), INVALID, "top_p must be in (0, 1]"),
        (dict(prompt="hi", top_p=1.5), INVALID, "top_p must be in (0, 1]"),
        (dict(prompt="x" * 100), INVALID, "--max-prompt-tokens"),
        (dict(prompt="x" * 60, max_new_tokens=240), INVALID, "the model's context is 256 tokens"),
        (dict(prompt="x" * 100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
    ids=[
        "empty-prompt",
        "zero-tokens",
        "negative-tokens",
        "absurd-tokens",
        "negative-temperature",
        "huge-temperature",
        "nan-temperature",
        "zero-top-p",
        "top-p-above-1",
        "prompt-over-limit",
        "prompt-plus-tokens-over-context",
        "prompt-over-message-size",
    ],
)
def test_malformed_request_gets_its_status_and_server_keeps_serving(client, request_kw, code, says):
    prompt = request_kw.pop("prompt")
    for call in (lambda: list(client.stream(prompt, **request_kw)), lambda: client.generate(prompt, **request_kw)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code
        assert says in e.value.details()
    assert client.health() == "SERVING"
    assert len(client.generate("abc", max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize(
    "extra, says",
    [
        (bytes([0x98, 0x06, 0x01]), "#99 (varint)"),  # field 99: a field moeflow.v1 does not have
        (bytes([0x12, 0x01, 0x41]), "#2 (length-delimited)"),  # max_new_tokens sent as a string
    ],
    ids=["unknown-number", "known-number-wrong-type"],
)
def test_unknown_fields_are_refused_by_number(server, client, extra, says):
    body = moeflow_pb2.GenerateRequest(prompt="hi").SerializeToString() + extra
    with grpc.insecure_channel(server.address) as channel:
        generate = channel.unary_stream(
            f"/{SERVICE_NAME}/Generate", response_deserializer=moeflow_pb2.GenerateResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as e:
            list(generate(body, timeout=30))
        assert e.value.code() == INVALID
        assert says in e.value.details() and "prompt=1, max_new_tokens=2" in e.value.details()
        # The same bytes without the stranger are fine.
        ok = list(generate(moeflow_pb2.GenerateRequest(prompt="hi", max_new_tokens=2).SerializeToString(), timeout=30))
        assert sum(len(r.token_ids) for r in ok) == 2
    assert client.health() == "SERVING"


def test_corrupt_bytes_are_refused_and_the_server_keeps_serving(server, client):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("GenerateUnary", "Generate"):
            call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
            with pytest.raises(grpc.RpcError) as e:
                call(b"\xff\xff\xff", timeout=30)
            assert e.value.code() == INVALID and "(3 bytes) could not be parsed" in e.value.details()
    assert len(client.generate("abc", max_new_tokens=3).token_ids) == 3


def test_refused_calls_leave_nothing_behind(server, client):
    """gRPC answered a message it could not parse (INTERNAL), then the handler answered again (the message was
    missing): a second status on a finished call, whose completion never came, so every such call kept its
    state in the server for good (the soak's RSS grew ~1.7 KB a call). Count the server's call states after
    each kind of refused call."""
    from grpc import _server

    def states() -> int:
        gc.collect()
        return sum(type(o) is _server._RPCState for o in gc.get_objects())

    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(f"/{SERVICE_NAME}/GenerateUnary")
        calls = {
            "corrupt bytes": lambda: raw(b"\xff\xff\xff", timeout=30),
            "empty prompt": lambda: raw(moeflow_pb2.GenerateRequest(prompt="").SerializeToString(), timeout=30),
            "no message": lambda: channel.stream_unary(f"/{SERVICE_NAME}/GenerateUnary")(iter(()), timeout=30),
        }
        for name, call in calls.items():
            before = states()
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == INVALID, name
            _wait_for(lambda before=before: states() <= before, f"the server to let go of {name} calls", timeout=10)
    assert client.health() == "SERVING"


def test_server_config_rejects_bad_settings():
    with pytest.raises(MoeflowError, match="unknown admission 'lifo'; choose one of: fifo, rebatch"):
        ServerConfig(admission="lifo")
    with pytest.raises(MoeflowError, match="--max-batch-size must be at least 1"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(MoeflowError, match="--max-queue must be >= 0"):
        ServerConfig(max_queue=-1)


def test_port_in_use_is_a_clear_error(checkpoint, server):
    with moeflow.load(checkpoint) as engine:
        with pytest.raises(MoeflowError, match="choose another --port"):
            start(engine, ServerConfig(port=server.port))


# ---- capacity, cancellation, deadlines, drain ------------------------------------------------------------------


def test_cancelled_stream_frees_its_place_at_once(checkpoint):
    with serving(checkpoint, max_batch_size=1, max_queue=0) as running, MoeflowClient(running.address, timeout=60) as c:
        stream = c.stream(LONG_PROMPT, max_new_tokens=240)
        first = next(iter(stream))
        assert first.token_ids and not first.finish_reason
        with pytest.raises(grpc.RpcError) as e:  # the only place is taken
            c.generate("abc", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue" in e.value.details()
        stats = c.stats()
        assert (stats["running"], stats["pooled"], stats["queue_depth"]) == (1, 1, 0)
        stream.cancel()
        _wait_for(lambda: c.stats()["requests_cancelled"] == 1, "the server to see the cancellation")
        stats = c.stats()
        assert (stats["requests_completed"], stats["running"], stats["requests_rejected"]) == (0, 0, 1)
        assert stats["generated_tokens"] < 240, "the cancelled sequence kept decoding"
        assert len(c.generate("abc", max_new_tokens=2).token_ids) == 2  # its place is free


def test_deadline_frees_a_waiting_request(checkpoint):
    with serving(checkpoint, max_batch_size=1, max_queue=1) as running, MoeflowClient(running.address, timeout=60) as c:
        stream = c.stream(LONG_PROMPT, max_new_tokens=240)
        next(iter(stream))
        with pytest.raises(grpc.RpcError) as e:  # queued behind the long request, its deadline passes
            c.generate("Hello, world!", max_new_tokens=200, timeout=0.05)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for(lambda: c.stats()["requests_cancelled"] == 1, "the server to drop the expired request")
        assert c.stats()["queue_depth"] == 0
        stream.cancel()


def test_shutdown_drains_in_flight_and_refuses_new(checkpoint):
    engine = moeflow.load(checkpoint, expert_budget="25%")
    running = start(engine, ServerConfig(port=0, max_batch_size=2))
    try:
        with MoeflowClient(running.address, timeout=60) as c:
            stream = iter(c.stream(LONG_PROMPT, max_new_tokens=240))
            replies = [next(stream)]
            drained: list[bool] = []
            stopper = threading.Thread(target=lambda: drained.append(running.shutdown(grace_s=60)))
            stopper.start()
            _wait_for(lambda: c.health() == "NOT_SERVING", "health to report NOT_SERVING")
            with pytest.raises(grpc.RpcError) as e:
                c.generate("abc", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in e.value.details()
            replies.extend(stream)  # the request taken before the drain runs to its end
            stopper.join(timeout=60)
    finally:
        engine.close()
    assert drained == [True]
    assert replies[-1].finish_reason == "length"
    assert _joined(replies)[1] == _solo_ids(checkpoint, LONG_PROMPT, 240)
