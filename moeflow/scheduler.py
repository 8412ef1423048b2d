"""Continuous batching: waiting sequences join the running batch at step boundaries.

The admission policy decides which waiting sequences are prefilled and which active ones decode
each step. FIFO decodes everyone it admitted; the token re-batcher (`moeflow.predictor.rebatch`)
keeps a larger pool and each step decodes the sequences whose predicted experts overlap most.
`run_batch` drives a scheduler over a list of prompts (`moeflow generate --prompts`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeflow.engine.batch import DecodeBatch, SequenceState
from moeflow.engine.engine import Engine, GenerationResult

# Prompts admitted together are prefilled in one forward of at most this many (padded) tokens: each expert
# is then read once per group instead of once per prompt. The group's activations grow with it (tokens x
# intermediate size per expert): 2048 ran the re-batcher's 128-prompt pool on the I/O-bound bench model
# (intermediate 8192) out of its cgroup memory limit; 512 keeps most of the saving (24-token prompts: ~20
# per group).
PREFILL_TOKENS = 512


def prefill_groups(seqs: list[SequenceState], max_tokens: int) -> list[list[SequenceState]]:
    """`seqs` in admission order, cut into groups whose left-padded prompts (group size x longest prompt)
    fit `max_tokens`; a prompt longer than that alone is a group of one."""
    groups: list[list[SequenceState]] = []
    longest = 0
    for seq in seqs:
        n = len(seq.prompt_ids)
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= max_tokens:
            groups[-1].append(seq)
            longest = max(longest, n)
        else:
            groups.append([seq])
            longest = n
    return groups


class AdmissionPolicy(ABC):
    """Decides who is prefilled into the active pool, and which active sequences decode each step.

    The scheduler keeps up to `pool_size(max_batch_size)` prefilled sequences (each with its own KV
    cache) and decodes at most `max_batch_size` of them per step. FIFO keeps the pool equal to the
    batch, so everyone active decodes every step; the token re-batcher keeps a larger pool and
    picks, step by step, the sequences whose next tokens are predicted to share experts.
    """

    name: str

    @abstractmethod
    def choose(self, waiting: list[SequenceState], active: list[SequenceState], free: int) -> list[SequenceState]:
        """Pick at most `free` of `waiting` (oldest first) to prefill into the active pool."""

    def pool_size(self, max_batch_size: int) -> int:
        return max_batch_size

    def select(self, active: list[SequenceState], max_batch_size: int) -> list[SequenceState]:
        """The active sequences (at most `max_batch_size`) that decode this step."""
        return active[:max_batch_size]


class FifoAdmission(AdmissionPolicy):
    name = "fifo"

    def choose(self, waiting: list[SequenceState], active: list[SequenceState], free: int) -> list[SequenceState]:
        return waiting[:free]


class Scheduler:
    """Owns one `DecodeBatch`; call `step()` repeatedly (one thread)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        admission: AdmissionPolicy,
        on_step: Callable[[DecodeBatch], None] | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.engine = engine
        self.batch = engine.new_batch()
        # A cache with recurrent or windowed state cannot be padded into a batch: one sequence decodes at a time.
        self.max_batch_size = 1 if engine.checkpoint.family.one_sequence_cache else max_batch_size
        self.admission = admission
        self.on_step = on_step
        self.prefill_tokens = prefill_tokens
        self.waiting: list[SequenceState] = []
        self.active: list[SequenceState] = []  # prefilled and unfinished; `batch.members` is this step's subset
        self.steps = 0
        # Decode forwards, and prefill forwards, that raised since the last of their kind that did not: the same
        # fault every time is an engine that cannot serve (the server declares it dead), one now and then is not.
        self.failed_decodes_in_a_row = 0
        self.failed_prefills_in_a_row = 0
        self.batch_sizes: list[int] = []
        self.distinct_experts: list[float] = []  # per decode step: distinct experts, mean over MoE layers

    def submit(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: SequenceState) -> None:
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
    def step(self) -> list[SequenceState]:
        """Admit, decode one token for this step's sequences, retire finished ones; returns those finished."""
        finished: list[SequenceState] = []
        free = self.admission.pool_size(self.max_batch_size) - len(self.active)
        if free > 0 and self.waiting:
            admitted = self.admission.choose(list(self.waiting), list(self.active), free)
            for seq in admitted:
                self.waiting.remove(seq)
            for group in prefill_groups(admitted, self.prefill_tokens):
                failed = self.batch.prefill_many(group)  # a sequence whose own prefill fails is failed, alone
                self.failed_prefills_in_a_row = self.failed_prefills_in_a_row + failed if failed == len(group) else 0
                for seq in group:
                    if seq.done:  # finished on its first token, or failed
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
            try:
                result = self.batch.step()
            except Exception as e:
                return finished + self._fail_batch(e)
            self.failed_decodes_in_a_row = 0
            if result is not None and result.routing:
                self.distinct_experts.append(
                    sum(len(e.plan.expert_ids) for e in result.routing) / len(result.routing)
                )
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.batch)
        done = self.batch.evict_finished()
        finished.extend(done)
        if done:
            self.active = [s for s in self.active if not s.done]
        return finished

    def _fail_batch(self, error: Exception) -> list[SequenceState]:
        """A decode forward raised: it was shared, so every member fails; the batched cache may be half
        extended, so it goes too. Active sequences outside this step keep their own caches and go on."""
        failed = list(self.batch.members)
        for seq in failed:
            seq.fail(error)
        self.failed_decodes_in_a_row += 1
        self.batch = self.engine.new_batch()
        self.active = [s for s in self.active if not s.done]
        return failed

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()


@dataclass(frozen=True, kw_only=True)
class BatchRun:
    results: list[GenerationResult]  # in prompt order
    elapsed_s: float
    batch_sizes: list[int]  # sequences decoded in each step
    distinct_experts: list[float]  # each decode step's distinct experts, mean over MoE layers


@torch.inference_mode()
def run_batch(
    engine: Engine,
    prompts: list[str | list[int]],
    *,
    batch_size: int = 8,
    admission: AdmissionPolicy | None = None,
    **sampling: object,
) -> BatchRun:
    """Continuous batching over `prompts` (results in input order), at most `batch_size` decoding at a time;
    also reports the run's wall time, batch sizes and distinct experts per step."""
    seqs = [engine.new_sequence(p, **sampling) for p in prompts]
    scheduler = Scheduler(engine, max_batch_size=batch_size, admission=admission or FifoAdmission())
    t0 = time.perf_counter()
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.run_until_idle()
    return BatchRun(
        results=[engine.result(s) for s in seqs],
        elapsed_s=time.perf_counter() - t0,
        batch_sizes=scheduler.batch_sizes,
        distinct_experts=scheduler.distinct_experts,
    )
