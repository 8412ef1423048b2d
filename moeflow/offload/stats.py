"""Cache statistics: what every run can report (hits, misses, prefetch accuracy, bytes, stalls)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class LayerStats:
    layer: int
    hits: int  # demanded experts that were resident or already on their way (no demand read)
    misses: int  # demanded experts read synchronously from the backing store
    prefetch_hits: int  # hits on an expert that a prefetch brought in, counted at its first use
    wasted_prefetches: int  # prefetched experts evicted before any use
    bytes_read: int
    stall_s: float  # time the compute thread waited for this layer's experts


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    hits: int
    misses: int
    prefetch_hits: int
    wasted_prefetches: int
    bytes_read: int
    stall_s: float
    reading_s: float  # time at least one read of the store was in progress, behind compute or not
    budget_bytes: int  # the user's ceiling on expert bytes in the fast tier
    slot_bytes: int  # bytes of one expert slot
    capacity_slots: int  # slots in the pool: capacity_slots * slot_bytes <= budget_bytes
    resident_peak_bytes: int  # most expert bytes ever resident at once (loaded or loading)
    direct_io: bool  # the disk store bypasses the page cache (O_DIRECT)
    per_layer: tuple[LayerStats, ...]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def read_gib_s(self) -> float | None:
        """The store's achieved read rate while it was reading (None before any read)."""
        return self.bytes_read / self.reading_s / 2**30 if self.reading_s > 0 else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hit_rate"] = self.hit_rate
        out["read_gib_s"] = self.read_gib_s
        out["per_layer"] = [asdict(s) for s in self.per_layer]
        return out
