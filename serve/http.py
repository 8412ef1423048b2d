"""The OpenAI-compatible HTTP API, served by the same engine worker as gRPC (Starlette on uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events ending
in `data: [DONE]`), GET /v1/models, GET /health (200 while serving, 503 when draining or the engine is dead),
GET /metrics (Prometheus text: requests, tokens, and the expert cache's hits, misses, prefetch hits, bytes
read and stall seconds). A bad request gets a 4xx with OpenAI's error object; the server goes on serving.
Handlers run the worker's blocking calls in threads, so the event loop never waits on the engine.

The gRPC server's protections apply here too: with --token-file every route but /health needs the header
`Authorization: Bearer TOKEN` (what OpenAI clients send as their API key; 401 otherwise), and --tls-cert /
--tls-key (with --tls-client-ca: mutual TLS) serve HTTPS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from moeflow.errors import MoeflowError, RequestError

from .config import ServerConfig, authorized
from .errors import CapacityError, DrainingError, EngineDead, ServeError
from .handle import Chunk, RequestHandle
from .metrics import CONTENT_TYPE, prometheus_text
from .openai_api import ApiRequest, Reply, error_body, parse_chat, parse_completion
from .worker import EngineWorker

log = logging.getLogger(__name__)


def _status(error: ServeError) -> tuple[int, str]:
    if isinstance(error, CapacityError):
        return 429, "rate_limit_error"
    if isinstance(error, (DrainingError, EngineDead)):
        return 503, "service_unavailable"
    return 500, "server_error"


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


OPEN_PATHS = frozenset({"/health"})  # as gRPC's health service: probes rarely carry a token, and it reveals one word


class BearerToken:
    """ASGI middleware: every HTTP route but OPEN_PATHS needs `Authorization: Bearer TOKEN` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not authorized(sent, self._token):
                response = _error(401, "this server needs a bearer token: send the header 'Authorization: Bearer "
                                  "TOKEN' (an OpenAI client's api_key)", "invalid_request_error")  # fmt: skip
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIApp:
    """The routes over one worker; `app` is the ASGI application (behind BearerToken when `token` is given)."""

    def __init__(self, worker: EngineWorker, model_name: str, token: str | None = None) -> None:
        self.worker = worker
        self.model_name = model_name
        self._tokenizer = worker.engine.locked_tokenizer
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
            middleware=[] if token is None else [Middleware(BearerToken, token=token)],
        )

    # ---- routes

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, lambda body: parse_completion(body))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, lambda body: parse_chat(body, self.worker.engine.tokenizer))

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "moeflow"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        dead = self.worker.dead
        if dead is not None:
            return _error(503, str(dead), "service_unavailable")
        if self.worker.draining:
            return _error(503, "the server is draining and takes no new requests", "service_unavailable")
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        try:
            stats = await run_in_threadpool(self.worker.stats)
        except ServeError as e:
            status, kind = _status(e)
            return _error(status, str(e), kind)
        return Response(prometheus_text(stats), media_type=CONTENT_TYPE)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(404, f"no route {request.url.path}; see /v1/completions, /v1/chat/completions, /v1/models",
                      "invalid_request_error")  # fmt: skip

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    # ---- generation

    async def _generate(self, request: Request, parse: object) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON ({e})", "invalid_request_error")
        try:
            api = parse(body)
            handle = await run_in_threadpool(self.worker.submit, api.generate)
        except (RequestError, MoeflowError) as e:
            return _error(400, str(e), "invalid_request_error")
        except ServeError as e:
            status, kind = _status(e)
            return _error(status, str(e), kind)
        reply = Reply(api, self.model_name, self._decode)
        if api.stream:
            return StreamingResponse(self._events(handle, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            chunk = await run_in_threadpool(handle.result)
        except ServeError as e:
            status, kind = _status(e)
            return _error(status, str(e), kind)
        except asyncio.CancelledError:  # the client left: free its place
            handle.cancel()
            raise
        return JSONResponse(reply.complete(chunk, _logprobs(handle, api, 0, chunk.completion_tokens)))

    async def _events(self, handle: RequestHandle, reply: Reply) -> AsyncIterator[str]:
        """The server-sent events of one streamed request; a client that leaves cancels it."""
        api = reply.request
        sent = 0  # tokens whose logprobs went out
        try:
            opening = reply.opening()
            if opening is not None:
                yield _sse(opening)
            last: Chunk | None = None
            async for chunk in iterate_in_threadpool(handle.chunks()):
                n = len(chunk.token_ids)
                out = reply.delta(chunk, _logprobs(handle, api, sent, sent + n))
                sent += n
                if out is not None:
                    yield _sse(out)
                last = chunk
            if api.include_usage and last is not None:
                yield _sse(reply.usage_chunk(last))
            yield _sse("[DONE]")
        except ServeError as e:  # the status line has gone out: the error travels as an event
            status, kind = _status(e)
            yield _sse(error_body(str(e), kind, code=str(status)))
        finally:
            handle.cancel()  # no-op once it finished

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id]) if self._tokenizer is not None else ""


def _logprobs(handle: RequestHandle, api: ApiRequest, start: int, stop: int) -> list | None:
    """The logprobs of tokens [start, stop) of the request (the engine thread wrote them before the tokens)."""
    if api.logprobs is None or handle.seq.logprobs is None:
        return None
    return handle.seq.logprobs[start:stop]


@dataclass(eq=False)
class RunningHttp:
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def shutdown(self) -> None:
        """Stop accepting connections and end the serving thread (open streams are closed)."""
        self.server.should_exit = True
        self.thread.join()


def start_http(worker: EngineWorker, config: ServerConfig, *, model_name: str) -> RunningHttp:
    """Serve the OpenAI API of `worker` on `config.host:config.http_port` (0: a free port; see `.port`) from a
    thread of its own, with the config's token and TLS settings."""
    port = config.http_port
    if port is None:
        raise MoeflowError("start_http needs config.http_port (0 for a free port)")
    tls = {}
    if config.tls_cert is not None:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        if config.tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    app = OpenAIApp(worker, model_name, token=config.token()).app
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=port, log_level="warning", lifespan="off",
                       timeout_graceful_shutdown=1, **tls)  # fmt: skip
    )
    thread = threading.Thread(target=server.run, name="moeflow-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise MoeflowError(f"cannot serve HTTP on {config.host}:{port}; choose another --http-port, or 0 for any")
        thread.join(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningHttp(server=server, thread=thread, host=config.host, port=bound, tls=bool(tls))
