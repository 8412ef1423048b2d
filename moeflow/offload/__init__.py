"""The offload layer: budget, slot pool and cache, eviction policies, backing stores, transfers, prefetch,
and the pass that routes a model's experts through them (`layer.apply_offload`)."""
