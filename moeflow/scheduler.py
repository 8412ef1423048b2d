"""Continuous batching: waiting sequences join the running batch at step boundaries.

The admission policy decides which waiting sequences are prefilled and which active ones decode
each step. FIFO decodes everyone it admitted; the token re-batcher (`predictor.rebatch`) keeps a
larger pool and each step decodes the sequences whose predicted experts overlap most.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moeflow.engine.batch import DecodeBatch, Sequence
from moeflow.errors import MoeflowError
from moeflow.offload.plans import RoutingPlan

if TYPE_CHECKING:
    from moeflow.engine import Engine


class AdmissionPolicy(ABC):
    """Decides who is prefilled into the active pool, and which active sequences decode each step.

    The scheduler keeps up to `pool_size(max_batch_size)` prefilled sequences (each with its own KV
    cache) and decodes at most `max_batch_size` of them per step. FIFO keeps the pool equal to the
    batch, so everyone active decodes every step; the token re-batcher keeps a larger pool and
    picks, step by step, the sequences whose next tokens are predicted to share experts.
    """

    name: str

    @abstractmethod
    def choose(self, waiting: list[Sequence], active: list[Sequence], free: int) -> list[Sequence]:
        """Pick at most `free` of `waiting` (oldest first) to prefill into the active pool."""

    def pool_size(self, max_batch_size: int) -> int:
        return max_batch_size

    def select(self, active: list[Sequence], max_batch_size: int) -> list[Sequence]:
        """The active sequences (at most `max_batch_size`) that decode this step."""
        return active[:max_batch_size]


class FifoAdmission(AdmissionPolicy):
    name = "fifo"

    def choose(self, waiting: list[Sequence], active: list[Sequence], free: int) -> list[Sequence]:
        return waiting[:free]


ADMISSIONS = ("fifo", "rebatch")


def make_admission(name: str, engine: Engine) -> AdmissionPolicy:
    """The admission policy called `name`: "fifo", or "rebatch" (the token re-batcher, `predictor.rebatch`)."""
    if name == "fifo":
        return FifoAdmission()
    if name == "rebatch":
        from moeflow.predictor.rebatch import RebatchAdmission

        return RebatchAdmission.for_engine(engine)
    raise MoeflowError(f"unknown admission policy {name!r}; choose one of: {', '.join(ADMISSIONS)}")


class Scheduler:
    """Owns one `DecodeBatch`; call `step()` repeatedly (one thread)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        admission: AdmissionPolicy,
        on_step: Callable[[DecodeBatch], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine = engine
        self.batch = engine.new_batch()
        self.max_batch_size = max_batch_size
        self.admission = admission
        self.on_step = on_step
        self.waiting: list[Sequence] = []
        self.active: list[Sequence] = []  # prefilled and unfinished; `batch.members` is this step's subset
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.distinct_experts: list[float] = []  # per decode step: distinct experts, mean over MoE layers
        self._step_plans: list[RoutingPlan] = []

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now and free its place (no-op if it already finished)."""
        if seq.done:
            return
        seq.finish_reason = "cancelled"
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.batch.members:
            self.batch.remove(seq)
        if seq in self.active:
            self.active.remove(seq)
        seq.kv = None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit, decode one token for this step's sequences, retire finished ones; returns those finished."""
        finished: list[Sequence] = []
        free = self.admission.pool_size(self.max_batch_size) - len(self.active)
        if free > 0 and self.waiting:
            for seq in self.admission.choose(list(self.waiting), list(self.active), free):
                self.waiting.remove(seq)
                self.batch.prefill(seq)
                if seq.done:  # finished on its first token
                    finished.append(seq)
                else:
                    self.active.append(seq)
        chosen = self.admission.select(list(self.active), self.max_batch_size) if self.active else []
        for seq in [s for s in self.batch.members if s not in chosen]:
            self.batch.remove(seq)
        for seq in chosen:
            if seq not in self.batch.members:
                self.batch.add(seq)
        if self.batch.members:
            self.batch_sizes.append(len(self.batch.members))
            self._step_plans.clear()
            observers = self.engine.runtime.observers
            observers.append(self._observe)
            try:
                self.batch.step()
            finally:
                observers.remove(self._observe)
            if self._step_plans:
                self.distinct_experts.append(
                    sum(len(p.expert_ids) for p in self._step_plans) / len(self._step_plans)
                )
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.batch)
        done = self.batch.evict_finished()
        finished.extend(done)
        if done:
            self.active = [s for s in self.active if not s.done]
        return finished

    def _observe(self, plan: RoutingPlan, top_k_index_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        self._step_plans.append(plan)

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()
