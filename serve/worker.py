"""The engine thread: the only thread that touches the engine's scheduler.

gRPC handler threads call `submit`, `cancel` and `stats`; the request is checked (`intake.RequestLimits`)
and left in the `intake.Intake` under its one lock, which wakes the engine thread. Between decode steps
the engine thread admits the new requests to the scheduler, cancels those whose clients left, answers
stats requests (`stats.StatsRecorder`), runs one step, and pushes each running sequence's new tokens to
its request's handle (`handle.RequestHandle`), whose handler thread turns them into `Chunk`s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from moeflow.engine import Engine
from moeflow.scheduler import AdmissionPolicy, Scheduler

from .config import ServerConfig
from .errors import DrainingError, EngineDead, EngineFailure, ServeError
from .handle import RequestHandle
from .intake import GenerateRequest, Intake, RequestLimits
from .stats import ServeStats, StatsRecorder

log = logging.getLogger(__name__)


# Steps in a row that fail in the scheduler itself, decode forwards in a row that raise, or prefill forwards in a
# row that raise (a read the cache cannot make, say), before the engine is declared dead: one may be a passing
# fault, the same fault every time is an engine that cannot serve. A request's own sampling failure never counts;
# a forward of the same kind that succeeds starts the count again.
MAX_FAILED_STEPS = 3


class EngineWorker:
    """Owns the scheduler and the thread that drives it.

    `on_death(error)` is called (on the engine thread) if that thread stops for good: an exception escaped
    its loop, or MAX_FAILED_STEPS steps (or forwards of one kind) failed in a row. From then on every request,
    waiting or new, fails at once with `EngineDead`, and `dead` says why.
    """

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig,
        admission: AdmissionPolicy,
        model: str = "",
        on_death: Callable[[EngineDead], None] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self._admission = admission
        self._scheduler = self._new_scheduler()
        self._limits = RequestLimits(engine, config)
        self._tokenizer = engine.locked_tokenizer
        self._intake = Intake(config)
        self._stats = StatsRecorder(config, admission=admission.name, model=model)
        self._live: dict[int, RequestHandle] = {}  # engine thread: seq_id -> handle of what the scheduler holds
        self._on_death = on_death
        self._failed_steps = 0  # engine thread: steps failed in a row
        self._thread = threading.Thread(target=self._loop, name="moeflow-engine", daemon=True)
        self._thread.start()

    # ---- called from handler threads --------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> RequestHandle:
        """Validate and queue; raises RequestError (the request is wrong) or ServeError (the server is busy)."""
        handle = RequestHandle(self._limits.sequence(request), self._tokenizer, self.cancel)
        self._intake.admit(handle)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        self._intake.cancel(handle)

    def stats(self, timeout: float = 30.0) -> ServeStats:
        """A snapshot taken by the engine thread at its next step boundary."""
        future: Future[ServeStats] = Future()
        self._intake.ask_stats(future)
        return future.result(timeout)

    @property
    def draining(self) -> bool:
        """New requests are refused (SIGTERM drain, or close)."""
        return self._intake.draining

    @property
    def dead(self) -> EngineDead | None:
        """Why the engine thread stopped for good; None while it serves."""
        return self._intake.dead

    def drain(self) -> None:
        """Refuse new requests from now on; the ones already taken run to the end."""
        self._intake.drain()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every taken request has finished; False on timeout."""
        return self._intake.wait_idle(timeout)

    def close(self) -> None:
        """Stop the engine thread; requests still running fail with DrainingError, new ones are refused."""
        self._intake.close()
        self._thread.join()

    # ---- the engine thread ------------------------------------------------------------------------

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.engine, max_batch_size=self.config.max_batch_size, admission=self._admission)

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - whatever stopped the thread, no client may wait for it
            log.exception("the engine thread stopped")
            self._die(EngineDead(f"the engine stopped ({e!r}); this server cannot serve until it is restarted"))

    def _die(self, error: EngineDead) -> None:
        orphans, asks = self._intake.kill(error)
        self._fail_all(error)
        for handle in orphans:
            handle.fail(error)
        for future in asks:
            future.set_exception(error)
        if self._on_death is not None:
            self._on_death(error)

    def _serve(self) -> None:
        while True:
            mail = self._intake.take(wait=self._scheduler.idle)
            for handle in mail.requests:
                self._scheduler.submit(handle.seq)
                self._live[handle.seq.seq_id] = handle
            for handle in mail.cancels:
                if self._live.pop(handle.seq.seq_id, None) is not None:
                    self._scheduler.cancel(handle.seq)
                    self._finish(handle)
            if mail.stats_wanted:
                snapshot = self._stats.snapshot(
                    self._scheduler,
                    self.engine.stats(),
                    rejected=self._intake.rejected,
                    draining=self._intake.draining,
                )
                for future in mail.stats_wanted:
                    future.set_result(snapshot)
            if mail.closing:
                self._fail_all(DrainingError("the server stopped before this request finished; send it again"))
                return
            if not self._scheduler.idle:
                self._step()

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            finished = self._scheduler.step()
        except Exception as e:  # the scheduler itself failed (the engine's failures come back per sequence)
            log.exception("decode step failed")
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise
            self._fail_all(EngineFailure(f"the engine failed during a decode step ({e!r}); see the server log"))
            self._scheduler = self._new_scheduler()
            return
        self._failed_steps = 0
        for kind in ("decode", "prefill"):
            if getattr(self._scheduler, f"failed_{kind}s_in_a_row") >= MAX_FAILED_STEPS:
                failed = next((seq.error for seq in finished if seq.error is not None), None)
                raise RuntimeError(f"the last {MAX_FAILED_STEPS} {kind} forwards failed, the last with {failed!r}")
        t1 = time.perf_counter()
        # Every live request, not only this step's batch: a prefill (first token) can happen without a decode.
        new_tokens = sum(handle.publish() for handle in self._live.values())
        for seq in finished:
            handle = self._live.pop(seq.seq_id)
            if seq.error is None:
                self._finish(handle)
                continue
            log.error("request %d failed", seq.seq_id, exc_info=seq.error)
            handle.fail(EngineFailure(f"the engine failed on this request ({seq.error!r}); see the server log"))
            self._stats.failed()
            self._intake.finished()
        self._stats.step(self._scheduler, t_start=t0, t_end=t1, new_tokens=new_tokens)

    def _finish(self, handle: RequestHandle) -> None:
        self._stats.finished(cancelled=handle.seq.finish_reason == "cancelled")
        handle.finish()
        self._intake.finished()

    def _fail_all(self, error: ServeError) -> None:
        for handle in self._live.values():
            handle.fail(error)
        if not isinstance(error, DrainingError):
            self._stats.failed(len(self._live))
        self._intake.finished(len(self._live))
        self._live.clear()
