"""moeflow: run Mixture-of-Experts models with most experts off the fast device, exactly.

Importing `moeflow` is cheap (no torch): the names below load their modules on first use, so
`moeflow.serve.client` and `moeflow --help` never pay for torch or transformers.

Shape legend — the one legend of the whole project (kernels, engine, predictor, training,
serve). A tensor's name ends in its shape, in these letters (``x_TD``, ``gate_up_S2ID``):

| letter | meaning |
|---|---|
| B | sequences in a batch |
| T | tokens in one forward (B x new tokens per sequence) |
| D | model hidden size |
| I | expert intermediate size (``gate_up`` stacks gate and up: 2I rows) |
| E | experts of one MoE layer (what the router scores) |
| K | experts per token (top-k) |
| S | slots of an expert weight pool (the cache's pool, or the experts a kernel is handed) |
| P | (token, k) pairs or routed assignments, T x K before dropping |
| L | MoE layers of the model |
| X | experts held by one rank (expert parallelism) |
| R | ranks |
| C | capacity: slots per expert when routing drops overflow |
| G | expert groups (grouped routing) |
| Q | cached positions (KV-cache length) |
| N | rows of anything else: trace tokens, received rows, samples |
| M | ranked predictions kept per token |
| W | context window of a predictor |
| V | vocabulary |

A digit is a literal size (``x_1D``); ``2I`` is twice I.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any


def _default_openmp_wait_policy() -> None:
    """Idle OpenMP workers sleep instead of spinning, unless the user chose (OMP_WAIT_POLICY, GOMP_SPINCOUNT).

    libgomp reads these once, when torch loads it, so this can only take effect before torch is imported;
    importing `moeflow` (and so the `moeflow` command) comes first in most programs. Why and the numbers:
    `moeflow.engine.engine.compute_threads` and bench/results/threads.json.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


_default_openmp_wait_policy()

_EXPORTS = {
    "DEFAULT_MODEL": "moeflow.config",
    "Engine": "moeflow.engine",
    "EngineConfig": "moeflow.config",
    "GenerationResult": "moeflow.engine",
    "load": "moeflow.build",
    "BudgetError": "moeflow.errors",
    "CheckpointError": "moeflow.errors",
    "MoeflowError": "moeflow.errors",
    "RequestError": "moeflow.errors",
    "UnsupportedArchitectureError": "moeflow.errors",
    "PrefetchPlan": "moeflow.offload.plans",
    "RoutingPlan": "moeflow.offload.plans",
    "SamplingParams": "moeflow.config",
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
    from moeflow.build import load
    from moeflow.config import DEFAULT_MODEL, EngineConfig, SamplingParams
    from moeflow.engine import Engine, GenerationResult
    from moeflow.errors import BudgetError, CheckpointError, MoeflowError, RequestError, UnsupportedArchitectureError
    from moeflow.offload.plans import PrefetchPlan, RoutingPlan
    from moeflow.offload.stats import CacheStats, LayerStats
