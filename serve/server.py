"""Assemble the gRPC server (moeflow.v1 + health + reflection) around an engine worker; drain on SIGTERM."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeflow.build import load, make_admission
from moeflow.config import EngineConfig
from moeflow.engine import Engine
from moeflow.errors import MoeflowError
from moeflow.scheduler import AdmissionPolicy

from .config import ServerConfig
from .guard import CONTROL_THREADS, CallGuard
from .proto import SERVICE_NAME, moeflow_pb2_grpc
from .servicer import MoeflowServicer
from .worker import EngineWorker

# Generation calls beyond the request capacity, so that those over it are refused with the intake's own message
# (which names --max-queue); past capacity + spare, the call guard refuses them before reading them. Health,
# stats and reflection have threads of their own (`guard.CONTROL_THREADS`).
SPARE_THREADS = 8


@dataclass(eq=False)
class RunningServer:
    server: grpc.Server
    worker: EngineWorker
    health: health.HealthServicer
    executor: ThreadPoolExecutor
    address: str  # host:port actually bound
    guard: CallGuard | None = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def shutdown(self, grace_s: float, *, interrupt: threading.Event | None = None) -> bool:
        """Drain: health goes NOT_SERVING, new requests get UNAVAILABLE, requests already taken run to the end
        (at most `grace_s`, or until `interrupt` is set; then they are cancelled). True when every taken request
        finished."""
        deadline = time.monotonic() + grace_s
        self.health.enter_graceful_shutdown()
        self.worker.drain()
        if interrupt is None:
            drained = self.worker.wait_idle(grace_s)
        else:  # in slices, so that `interrupt` ends the wait within 0.1 s
            drained = self.worker.wait_idle(0.0)
            while not (drained or interrupt.is_set()) and time.monotonic() < deadline:
                drained = self.worker.wait_idle(min(0.1, max(deadline - time.monotonic(), 0.0)))
        # The handlers still send the final messages: give them the rest of the grace period.
        self.server.stop(grace=max(deadline - time.monotonic(), 0.0) if drained else 0.0).wait()
        self.worker.close()
        self.executor.shutdown(wait=False)
        if self.guard is not None:
            self.guard.close()
        return drained


def start(
    engine: Engine, config: ServerConfig, *, model_name: str = "", admission: AdmissionPolicy | None = None
) -> RunningServer:
    """Start serving `engine` on `config.host:config.port` (port 0: a free one; see `.address`).

    `admission`: a policy object instead of the one `config.admission` names (an embedding program's own).
    """
    token, credentials = config.token(), server_credentials(config)  # a missing or empty file fails here, first
    if admission is None:
        admission = make_admission(config.admission, engine, pool_factor=config.rebatch_pool)
    health_servicer = health.HealthServicer()

    def on_death(_: Exception) -> None:
        for service in ("", SERVICE_NAME):
            health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    worker = EngineWorker(engine, config, admission, model=model_name, on_death=on_death)
    threads = config.capacity + SPARE_THREADS
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeflow-grpc")
    guard = CallGuard(
        generation_limit=threads,
        control_limit=CONTROL_THREADS,
        idle_timeout_s=config.idle_timeout_s,
        token=token,
    )
    server = grpc.server(
        executor,
        interceptors=[guard],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ],
    )
    moeflow_pb2_grpc.add_MoeflowServicer_to_server(MoeflowServicer(worker), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    address = f"{host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # gRPC raises when the address cannot be bound
        worker.close()
        guard.close()
        raise MoeflowError(f"cannot listen on {host}:{config.port} ({e}); choose another --port, or 0 for any") from e
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if worker.dead is not None:  # it died before SERVING was set
        on_death(worker.dead)
    return RunningServer(
        server=server,
        worker=worker,
        health=health_servicer,
        executor=executor,
        address=f"{host}:{port}",
        guard=guard,
    )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from --tls-cert/--tls-key; with --tls-client-ca, clients must present a certificate that CA signed."""
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=None if config.tls_client_ca is None else Path(config.tls_client_ca).read_bytes(),
        require_client_auth=config.tls_client_ca is not None,
    )


def run(model: Path | None, engine_config: EngineConfig, config: ServerConfig) -> int:
    """`moeflow serve`: load, serve until SIGTERM or SIGINT, then drain. Exit status 0 when all requests finished."""
    stop, now = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():  # a second signal while draining: stop now; a third ends the process outright
            now.set()
            for sig in previous:
                signal.signal(sig, signal.SIG_DFL)
            print("moeflow: second signal: cancelling the requests still running", file=sys.stderr, flush=True)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with load(model, **dataclasses.asdict(engine_config)) as engine:
            running = start(engine, config, model_name=engine.checkpoint.path.name)
            http = None
            if config.http_port is not None:
                from .http import start_http  # starlette and uvicorn only for a server that serves HTTP

                http = start_http(running.worker, config, model_name=engine.checkpoint.path.name)
                print(f"moeflow: OpenAI-compatible HTTP API on {http.url}/v1", file=sys.stderr, flush=True)
            print(
                f"moeflow: serving {engine.checkpoint.path} on {running.address} (admission {config.admission}, "
                f"batch <= {config.max_batch_size}, queue <= {config.max_queue}, expert budget "
                f"{engine_config.expert_budget}); SIGTERM drains",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                pass
            print(
                f"moeflow: draining (up to {config.grace_s:g} s; a second signal stops now); new requests are refused",
                file=sys.stderr,
                flush=True,
            )
            drained = running.shutdown(config.grace_s, interrupt=now)
            if http is not None:
                http.shutdown()
            print(
                "moeflow: stopped"
                + ("" if drained else "; the requests still running were cancelled"),
                file=sys.stderr,
                flush=True,
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if drained else 1
