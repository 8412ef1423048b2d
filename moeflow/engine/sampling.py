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


class SeenTokens:
    """A sequence's tokens so far as a mask over the vocabulary, for the repetition penalty. `history` is read in
    place as it grows (`TokenHistory`); each `mask` call adds only the tokens added since the last one, so a
    decode step costs one write, not a pass over the whole history (which cost ~170 us a step at 300 tokens on
    this project's 2-core VM: ~2-3% of a decode step of the shipped model)."""

    def __init__(self, history: Sequence[int]) -> None:
        self.history = history
        self._mask_V: torch.Tensor | None = None
        self._count = 0  # tokens of `history` in the mask

    def mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[V] bool: True for the tokens of the history (ids beyond the output vocabulary cannot be generated)."""
        if self._mask_V is None or self._mask_V.shape[0] != vocab or self._mask_V.device != device:
            self._mask_V, self._count = torch.zeros(vocab, dtype=torch.bool, device=device), 0
        n = len(self.history)
        if n > self._count:
            new = [t for t in self.history[self._count : n] if t < vocab]
            if len(new) == 1:  # a decode step
                self._mask_V[new[0]] = True
            elif new:
                self._mask_V[torch.tensor(new, dtype=torch.long, device=device)] = True
            self._count = n
        return self._mask_V


def penalize_seen(logits_V: torch.Tensor, seen_V: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each token where `seen_V` is True has its logit divided by
    `penalty` when positive, multiplied when negative (a new tensor; `logits_V` is not changed)."""
    return torch.where(seen_V, torch.where(logits_V < 0, logits_V * penalty, logits_V / penalty), logits_V)


def penalize_repetition(logits_V: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """`penalize_seen` for the tokens `seen` (repeats allowed)."""
    return penalize_seen(logits_V, SeenTokens(seen).mask(logits_V.shape[-1], logits_V.device), penalty)


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
    logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: SeenTokens | None = None
) -> int:
    """The next token for one sequence; `seen`: its prompt and output so far (for the repetition penalty)."""
    if params.repetition_penalty != 1 and seen is not None and len(seen.history):
        logits_V = penalize_seen(logits_V, seen.mask(logits_V.shape[-1], logits_V.device), params.repetition_penalty)
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
