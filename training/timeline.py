"""Wall-clock spans of one rank's step, by lane: 'compute' (expert maths on the main thread),
'comm' (an all-to-all from issue to completion, recorded by the communication thread) and
'wait' (the main thread blocked on an all-to-all: communication that was not hidden)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Span:
    lane: str
    label: str
    start: float  # seconds since the timeline's origin
    end: float


class Timeline:
    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, lane: str, label: str, start: float, end: float) -> None:
        """Times from time.perf_counter(); safe to call from any thread."""
        with self._lock:
            self._spans.append(Span(lane=lane, label=label, start=start - self.origin, end=end - self.origin))

    @contextmanager
    def span(self, lane: str, label: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(lane, label, started, time.perf_counter())

    def spans(self) -> list[Span]:
        with self._lock:
            return sorted(self._spans, key=lambda s: s.start)

    def total(self, lane: str) -> float:
        return sum(s.end - s.start for s in self.spans() if s.lane == lane)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.origin = time.perf_counter()
