"""The engine layer: a transformers MoE model whose experts live in the offload cache, and generation."""

from moeflow.config import EngineConfig
from moeflow.engine.engine import DEFAULT_MODEL, BatchRun, Engine, GenerationResult, load, peak_rss_bytes

__all__ = ["DEFAULT_MODEL", "BatchRun", "Engine", "EngineConfig", "GenerationResult", "load", "peak_rss_bytes"]
