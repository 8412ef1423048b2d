"""A small Python client for the moeflow.v1 service (no torch needed on the client side)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .proto import moeflow_pb2, moeflow_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True, kw_only=True)
class Response:
    """One streamed message (its new text and ids), or a whole unary reply.

    A stream's every message carries the request's figures so far: `completion_tokens` counts the tokens up to
    and including this message's, `elapsed_s` and `time_to_first_token_s` are seconds since the call started on
    the client's clock. The last message (`finish_reason` set: stop, length or cancelled; "" before it) carries
    the server's own figures instead, and `prompt_tokens`, which the server reports only then (None before).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int
    time_to_first_token_s: float | None  # None while no token has arrived
    elapsed_s: float

    def to_json(self) -> dict:
        """One JSON line of `moeflow client --json`: null for what is not known yet (finish_reason, prompt_tokens)."""
        plain = dataclasses.asdict(self)
        return {**plain, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason or None}

    @classmethod
    def from_proto(cls, msg: Message) -> Response:
        return cls(
            text=msg.text,
            token_ids=tuple(msg.token_ids),
            finish_reason=msg.finish_reason,
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            time_to_first_token_s=msg.time_to_first_token_s,
            elapsed_s=msg.elapsed_s,
        )


class Stream:
    """A running `Generate` call: iterate for `Response`s; `cancel()` frees the server's slot at once.

    `started` is the `time.perf_counter()` at which the call was made: the client's clock for the figures of the
    messages before the last (the server sends its own with the last only)."""

    def __init__(self, call: grpc.Call, started: float) -> None:
        self._call = call
        self._started = started

    def __iter__(self) -> Iterator[Response]:
        tokens, first_token_s = 0, None
        for msg in self._call:
            reply = Response.from_proto(msg)
            if reply.finish_reason:
                yield reply
                continue
            elapsed_s = time.perf_counter() - self._started
            tokens += len(reply.token_ids)
            if first_token_s is None and reply.token_ids:
                first_token_s = elapsed_s
            yield dataclasses.replace(reply, prompt_tokens=None, completion_tokens=tokens,
                                      time_to_first_token_s=first_token_s, elapsed_s=elapsed_s)

    def cancel(self) -> None:
        self._call.cancel()


def make_request(
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
) -> Message:
    """A `moeflow.v1.GenerateRequest`; None leaves a field unset (the server's default)."""
    msg = moeflow_pb2.GenerateRequest(prompt=prompt, temperature=temperature)
    if max_new_tokens is not None:
        msg.max_new_tokens = max_new_tokens
    if top_p is not None:
        msg.top_p = top_p
    if seed is not None:
        msg.seed = seed
    return msg


def plain(value: object) -> object:
    """A message as dicts, lists and numbers (proto3's JSON mapping would turn int64 counts into strings)."""
    if isinstance(value, Message):
        return {f.name: plain(getattr(value, f.name)) for f in value.DESCRIPTOR.fields}
    if isinstance(value, (str, bytes, int, float, bool)):
        return value
    if hasattr(value, "items"):  # map field
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value]  # repeated field


class MoeflowClient:
    """`with MoeflowClient("127.0.0.1:50051") as c: print(c.generate("Once upon").text)`.

    Sampling keywords of `stream` and `generate`: max_new_tokens, temperature (0 = greedy), top_p, seed.
    Errors are `grpc.RpcError`s; `.code()` and `.details()` say what was wrong.

    A server started with TLS: `tls=True` (the system's trusted CAs) or `tls_ca` (PEM of the CA that signed the
    server's certificate); with mutual TLS also `tls_cert` and `tls_key`, the client's own. A server started
    with --token-file: `token`, sent as `authorization: Bearer TOKEN` with every call.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls or tls_ca or tls_cert or tls_key:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
            )
            self._channel = grpc.secure_channel(address, credentials)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = moeflow_pb2_grpc.MoeflowStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def stream(self, prompt: str, *, timeout: float | None = None, **sampling: object) -> Stream:
        started = time.perf_counter()
        call = self._stub.Generate(
            make_request(prompt, **sampling), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return Stream(call, started)

    def generate(self, prompt: str, *, timeout: float | None = None, **sampling: object) -> Response:
        """The unary call: the whole text at once."""
        msg = self._stub.GenerateUnary(
            make_request(prompt, **sampling), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return Response.from_proto(msg)

    def stats(self, *, timeout: float | None = None) -> dict:
        """GetStats as a JSON-able dict: field names as in the proto, every field present, numbers as numbers."""
        request = moeflow_pb2.GetStatsRequest()
        return plain(self._stub.GetStats(request, timeout=timeout or self.timeout, metadata=self._metadata))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, or SERVICE_UNKNOWN (gRPC health protocol)."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._health.Check(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MoeflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_cli(
    address: str,
    prompt: str | None,
    *,
    sampling: dict,
    unary: bool = False,
    as_json: bool = False,
    show_stats: bool = False,
    timeout: float | None = None,
    connection: dict | None = None,
) -> int:
    """`moeflow client`: stream (or unary) one prompt to stdout, and/or print the server's stats as JSON.
    `connection`: MoeflowClient's TLS and token keywords."""
    with MoeflowClient(address, timeout=timeout, **(connection or {})) as client:
        try:
            if prompt is not None:
                replies = [client.generate(prompt, **sampling)] if unary else client.stream(prompt, **sampling)
                if not as_json:
                    print(prompt, end="", flush=True)
                for reply in replies:
                    if as_json:
                        print(json.dumps(reply.to_json()), flush=True)
                    else:
                        print(reply.text, end="", flush=True)
                if not as_json:
                    print()
                    print(
                        f"[{reply.completion_tokens} tokens, finish {reply.finish_reason}, first token after "
                        f"{reply.time_to_first_token_s:.3f} s, {reply.elapsed_s:.3f} s in all]",
                        file=sys.stderr,
                    )
            if show_stats:
                print(json.dumps(client.stats(), indent=2))
        except grpc.RpcError as e:
            print(f"moeflow: error: {e.code().name} from {address}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
