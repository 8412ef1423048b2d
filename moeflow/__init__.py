"""moeflow: run Mixture-of-Experts models with most experts off the fast device, exactly.

Importing `moeflow` is cheap (no torch): the names below load their modules on first use, so
`moeflow.serve.client` and `moeflow --help` never pay for torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MODEL": "moeflow.engine",
    "Engine": "moeflow.engine",
    "EngineConfig": "moeflow.engine",
    "GenerationResult": "moeflow.engine",
    "load": "moeflow.engine",
    "BudgetError": "moeflow.errors",
    "CheckpointError": "moeflow.errors",
    "MoeflowError": "moeflow.errors",
    "RequestError": "moeflow.errors",
    "UnsupportedArchitectureError": "moeflow.errors",
    "PrefetchPlan": "moeflow.offload.plans",
    "RoutingPlan": "moeflow.offload.plans",
    "SamplingParams": "moeflow.engine.sampling",
    "CacheStats": "moeflow.offload.stats",
    "LayerStats": "moeflow.offload.stats",
}

__all__ = [
    "BudgetError",
    "CacheStats",
    "CheckpointError",
    "DEFAULT_MODEL",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "LayerStats",
    "MoeflowError",
    "PrefetchPlan",
    "RequestError",
    "RoutingPlan",
    "SamplingParams",
    "UnsupportedArchitectureError",
    "load",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from moeflow.engine import DEFAULT_MODEL, Engine, EngineConfig, GenerationResult, load
    from moeflow.engine.sampling import SamplingParams
    from moeflow.errors import BudgetError, CheckpointError, MoeflowError, RequestError, UnsupportedArchitectureError
    from moeflow.offload.plans import PrefetchPlan, RoutingPlan
    from moeflow.offload.stats import CacheStats, LayerStats
