"""What `GetStats` reports: the engine thread's running totals, and one snapshot of them."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from moeflow.offload.stats import CacheStats
    from moeflow.scheduler import Scheduler

TOKENS_PER_S_WINDOW_S = 10.0


@dataclass(frozen=True, kw_only=True)
class ServeStats:
    cache: CacheStats
    queue_depth: int
    running: int  # sequences in the current decode step
    pooled: int  # prefilled sequences holding a KV cache (the re-batcher keeps more than a batch)
    max_batch_size: int
    max_queue: int
    batch_size_steps: dict[int, int]  # decode steps run at each batch size
    mean_distinct_experts: float  # per decode step and MoE layer: what the re-batcher lowers
    tokens_per_s: float  # over the last TOKENS_PER_S_WINDOW_S seconds
    generated_tokens: int
    steps: int
    requests_completed: int
    requests_cancelled: int
    requests_failed: int  # the engine failed on them, or stopped under them
    requests_rejected: int
    uptime_s: float
    busy_s: float
    admission: str
    model: str
    draining: bool

    @property
    def mean_batch_size(self) -> float:
        steps = sum(self.batch_size_steps.values())
        return sum(b * n for b, n in self.batch_size_steps.items()) / steps if steps else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        used, wasted = self.cache.prefetch_hits, self.cache.wasted_prefetches
        return used / (used + wasted) if used + wasted else 0.0


class StatsRecorder:
    """Running totals of the engine thread (only it calls these)."""

    def __init__(self, config: ServerConfig, *, admission: str, model: str) -> None:
        self._config = config
        self._admission = admission
        self._model = model
        self._batch_size_steps: Counter[int] = Counter()
        self._distinct_experts_sum = 0.0
        self._distinct_experts_steps = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()  # (step end, tokens) within the window
        self._generated = 0
        self._completed = 0
        self._cancelled = 0
        self._failed = 0
        self._busy_s = 0.0
        self._t_start = time.perf_counter()

    def step(self, scheduler: Scheduler, *, t_start: float, t_end: float, new_tokens: int) -> None:
        """One scheduler step that produced `new_tokens`; empties the scheduler's per-step lists."""
        self._busy_s += t_end - t_start
        # The scheduler's per-step lists grow forever; the server keeps a histogram and a running sum.
        self._batch_size_steps.update(scheduler.batch_sizes)
        scheduler.batch_sizes.clear()
        self._distinct_experts_sum += sum(scheduler.distinct_experts)
        self._distinct_experts_steps += len(scheduler.distinct_experts)
        scheduler.distinct_experts.clear()
        self._generated += new_tokens
        self._recent_tokens.append((t_end, new_tokens))
        while self._recent_tokens[0][0] < t_end - TOKENS_PER_S_WINDOW_S:
            self._recent_tokens.popleft()

    def failed(self, count: int = 1) -> None:
        self._failed += count

    def finished(self, *, cancelled: bool) -> None:
        if cancelled:
            self._cancelled += 1
        else:
            self._completed += 1

    def snapshot(self, scheduler: Scheduler, cache: CacheStats, *, rejected: int, draining: bool) -> ServeStats:
        now = time.perf_counter()
        recent = [n for t, n in self._recent_tokens if t >= now - TOKENS_PER_S_WINDOW_S]
        window = min(TOKENS_PER_S_WINDOW_S, now - self._t_start)
        return ServeStats(
            cache=cache,
            queue_depth=len(scheduler.waiting),
            running=len(scheduler.batch.members),
            pooled=len(scheduler.active),
            max_batch_size=self._config.max_batch_size,
            max_queue=self._config.max_queue,
            batch_size_steps=dict(self._batch_size_steps),
            mean_distinct_experts=self._distinct_experts_sum / max(self._distinct_experts_steps, 1),
            tokens_per_s=sum(recent) / window if window > 0 else 0.0,
            generated_tokens=self._generated,
            steps=sum(self._batch_size_steps.values()),
            requests_completed=self._completed,
            requests_cancelled=self._cancelled,
            requests_failed=self._failed,
            requests_rejected=rejected,
            uptime_s=now - self._t_start,
            busy_s=self._busy_s,
            admission=self._admission,
            model=self._model,
            draining=draining,
        )
