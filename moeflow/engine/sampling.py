"""The next-token rule shared by every generation path (the parameters: `moeflow.config.SamplingParams`).

Each sequence is sampled from its own row of logits with its own (resolved) parameters, so requests with
different settings share a batch. The processing order is transformers' `generate`: repetition penalty,
then temperature, top-k, top-p, min-p. Greedy (temperature 0) is the argmax of the penalised logits; with
no penalty it is the argmax of the model's logits untouched, so greedy output stays exactly transformers'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeflow.config import SamplingParams


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """The chosen token's log-probability under the model (before penalty, temperature and truncation), and
    the `SamplingParams.logprobs` most likely tokens with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def penalize_repetition(logits_V: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each token in `seen` has its logit divided by
    `penalty` when positive, multiplied when negative (a new tensor; `logits_V` is not changed)."""
    ids = torch.unique(torch.tensor(list(seen), dtype=torch.long, device=logits_V.device))
    ids = ids[ids < logits_V.shape[-1]]  # ids beyond the output vocabulary cannot be generated anyway
    picked = logits_V[ids]
    out = logits_V.clone()
    out[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def warp(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks (transformers' warpers, in their order)."""
    # Shifted so that the most likely token scores exactly 0, and divided in float64: any temperature in range
    # is safe. Unshifted, logits / 1e-40 overflow float32 to inf and the softmax is nan; in float32 a temperature
    # below its smallest normal may round to 0.
    logits_V = logits_V.float()
    scores_V = ((logits_V.double() - logits_V.max()) / params.temperature).float()
    if params.top_k and params.top_k < scores_V.shape[-1]:
        kth = torch.topk(scores_V, params.top_k).values[-1]
        scores_V = scores_V.masked_fill(scores_V < kth, -torch.inf)
    if params.top_p < 1:
        sorted_V, order = torch.sort(scores_V, descending=True)
        sorted_p = torch.softmax(sorted_V, dim=-1)
        drop = torch.cumsum(sorted_p, dim=0) - sorted_p >= params.top_p  # always keeps the most likely token
        scores_V = scores_V.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), -torch.inf)
    if params.min_p > 0:
        probs_V = torch.softmax(scores_V, dim=-1)
        scores_V = scores_V.masked_fill(probs_V < params.min_p * probs_V.max(), -torch.inf)
    return scores_V


def sample_next(
    logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: Sequence[int] = ()
) -> int:
    """The next token for one sequence; `seen` is its prompt and output so far (for the repetition penalty)."""
    if params.repetition_penalty != 1 and seen:
        logits_V = penalize_repetition(logits_V, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits_V.argmax(dim=-1))
    probs_V = torch.softmax(warp(logits_V, params), dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def token_logprob(logits_V: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the model's distribution, and the `top` most likely alternatives."""
    logprobs_V = torch.log_softmax(logits_V.float(), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs_V, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token, logprob=float(logprobs_V[token]), top=alternatives)
