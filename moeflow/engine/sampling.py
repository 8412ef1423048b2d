"""The next-token rule shared by every generation path (the parameters: `moeflow.config.SamplingParams`)."""

from __future__ import annotations

import torch

from moeflow.config import SamplingParams


def sample_next(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0 (transformers' argmax), else temperature + nucleus sampling."""
    if params.temperature == 0:
        return int(logits_V.argmax(dim=-1))
    # Shifted so that the most likely token scores exactly 0, and divided in float64: any temperature in range
    # is safe. Unshifted, logits / 1e-40 overflow float32 to inf and the softmax is nan; in float32 a temperature
    # below its smallest normal may round to 0.
    logits_V = logits_V.float()
    scores_V = ((logits_V.double() - logits_V.max()) / params.temperature).float()
    probs_V = torch.softmax(scores_V, dim=-1)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs_V, descending=True)
        keep = torch.cumsum(sorted_p, dim=0) - sorted_p < params.top_p  # always keeps the most likely token
        probs_V = torch.zeros_like(probs_V).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs_V, 1, generator=generator))
