"""moeflow: run Mixture-of-Experts models with most experts off the fast device, exactly."""

from .engine import DEFAULT_MODEL, Engine, EngineConfig, GenerationResult, load
from .errors import BudgetError, CheckpointError, MoeflowError, RequestError, UnsupportedArchitectureError
from .plans import PrefetchPlan, RoutingPlan
from .sampling import SamplingParams
from .stats import CacheStats, LayerStats

__all__ = [
    "DEFAULT_MODEL",
    "BudgetError",
    "CacheStats",
    "CheckpointError",
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
