"""`/metrics`: a `ServeStats` snapshot in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from .stats import ServeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: ServeStats) -> str:
    """Counters (`_total`) and gauges of the server and its expert cache, labelled with the model's name."""
    cache = stats.cache
    label = f'{{model="{_escape(stats.model)}"}}'
    rows: list[tuple[str, str, str, float]] = [
        ("moeflow_requests_completed_total", "counter", "requests that finished (stop or length)",
         stats.requests_completed),
        ("moeflow_requests_cancelled_total", "counter", "requests cancelled (the client left)",
         stats.requests_cancelled),
        ("moeflow_requests_rejected_total", "counter", "requests refused (server full, draining or dead)",
         stats.requests_rejected),
        ("moeflow_generated_tokens_total", "counter", "tokens generated", stats.generated_tokens),
        ("moeflow_decode_steps_total", "counter", "batched decode steps", stats.steps),
        ("moeflow_busy_seconds_total", "counter", "seconds the engine thread spent stepping", stats.busy_s),
        ("moeflow_uptime_seconds", "gauge", "seconds since the server started", stats.uptime_s),
        ("moeflow_queue_depth", "gauge", "requests waiting for a place in the batch", stats.queue_depth),
        ("moeflow_running_sequences", "gauge", "sequences in the current decode step", stats.running),
        ("moeflow_tokens_per_second", "gauge", "tokens generated per second over the last 10 s", stats.tokens_per_s),
        ("moeflow_draining", "gauge", "1 while the server drains (refuses new requests)", int(stats.draining)),
        ("moeflow_cache_hits_total", "counter", "expert lookups served from the fast tier", cache.hits),
        ("moeflow_cache_misses_total", "counter", "expert lookups that waited for a read", cache.misses),
        ("moeflow_cache_prefetch_hits_total", "counter", "hits on experts a prefetch brought in", cache.prefetch_hits),
        ("moeflow_cache_wasted_prefetches_total", "counter", "prefetched experts evicted unused",
         cache.wasted_prefetches),
        ("moeflow_cache_bytes_read_total", "counter", "expert bytes read from the backing store", cache.bytes_read),
        ("moeflow_cache_stall_seconds_total", "counter", "seconds compute waited for expert reads", cache.stall_s),
        ("moeflow_cache_reading_seconds_total", "counter",
         "seconds a read of the backing store was in progress (bytes_read_total / this: its read rate)",
         cache.reading_s),
        ("moeflow_cache_hit_ratio", "gauge", "hits / (hits + misses)", cache.hit_rate),
        ("moeflow_cache_budget_bytes", "gauge", "the expert budget's ceiling on fast-tier bytes", cache.budget_bytes),
        ("moeflow_cache_resident_peak_bytes", "gauge", "most expert bytes ever resident at once",
         cache.resident_peak_bytes),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {float(value)!r}"]
    return "\n".join(lines) + "\n"
