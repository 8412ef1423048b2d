"""Continuous batching: waiting sequences join the running batch at step boundaries.

The admission policy decides which waiting sequences take the free places. FIFO takes the oldest;
the token re-batcher (predictor issue) prefers sequences whose predicted experts overlap the batch's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .batching import DecodeBatch, Sequence
from .errors import MoeflowError

if TYPE_CHECKING:
    from .engine import Engine


class AdmissionPolicy(ABC):
    name: str

    @abstractmethod
    def choose(self, waiting: list[Sequence], running: list[Sequence], free: int) -> list[Sequence]:
        """Pick at most `free` of `waiting` (oldest first) to join `running`."""


class FifoAdmission(AdmissionPolicy):
    name = "fifo"

    def choose(self, waiting: list[Sequence], running: list[Sequence], free: int) -> list[Sequence]:
        return waiting[:free]


ADMISSIONS = ("fifo", "rebatch")


def make_admission(name: str, engine: Engine) -> AdmissionPolicy:
    """The admission policy called `name`: "fifo", or "rebatch" (the token re-batcher, `predictor.rebatch`)."""
    if name == "fifo":
        return FifoAdmission()
    if name == "rebatch":
        from predictor.rebatch import RebatchAdmission

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
        self.steps = 0
        self.batch_sizes: list[int] = []

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now and free its place (no-op if it already finished)."""
        if seq.done:
            return
        seq.finish_reason = "cancelled"
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.batch.members:
            self.batch.remove(seq)
        seq.kv = None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.batch.members

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit, decode one token for the batch, retire finished sequences; returns those finished."""
        finished: list[Sequence] = []
        free = self.max_batch_size - len(self.batch.members)
        if free > 0 and self.waiting:
            for seq in self.admission.choose(list(self.waiting), list(self.batch.members), free):
                self.waiting.remove(seq)
                self.batch.prefill(seq)
                if seq.done:  # finished on its first token
                    finished.append(seq)
                else:
                    self.batch.add(seq)
        if self.batch.members:
            self.batch_sizes.append(len(self.batch.members))
            self.batch.step()
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.batch)
        finished.extend(self.batch.evict_finished())
        return finished

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()
