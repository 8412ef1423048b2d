"""The engine layer: a transformers MoE model whose experts live in the offload cache, and generation."""

from moeflow.config import EngineConfig
from moeflow.engine.engine import DEFAULT_MODEL, Engine, GenerationResult, peak_rss_bytes

__all__ = ["DEFAULT_MODEL", "Engine", "EngineConfig", "GenerationResult", "peak_rss_bytes"]
