"""Sampling parameters (validated) and the next-token rule shared by every generation path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeflow.errors import RequestError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise RequestError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise RequestError(f"temperature must be a finite number, got {self.temperature!r}")
        if not 0 <= self.temperature <= 100:
            raise RequestError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")


def sample_next(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0 (transformers' argmax), else temperature + nucleus sampling."""
    if params.temperature == 0:
        return int(logits_V.argmax(dim=-1))
    probs_V = torch.softmax(logits_V.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs_V, descending=True)
        keep = torch.cumsum(sorted_p, dim=0) - sorted_p < params.top_p  # always keeps the most likely token
        probs_V = torch.zeros_like(probs_V).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs_V, 1, generator=generator))
