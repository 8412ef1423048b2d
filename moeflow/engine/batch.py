"""Decode many sequences together with exact per-sequence results.

Each sequence is prefilled alone (so its prompt sees exactly the solo computation) and keeps its
own KV cache. A `DecodeBatch` runs one token for all its members in one forward: their caches are
left-padded to a common length and the pads masked, with explicit position ids, so every
sequence's tokens equal its solo greedy generation. Members can join and leave between steps
(continuous batching); the padded cache is rebuilt only when membership changes.
Legend: B sequences, L cached positions, V vocabulary.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from moeflow.config import SamplingParams
from moeflow.engine.sampling import sample_next

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state across prefill and decode steps."""

    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled", None while running
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, heads, L, d], no padding
    generator: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class DecodeBatch:
    """The sequences decoding together, and their padded KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        eos_token_ids: set[int],
        *,
        before_forward: Callable[[list[list[int]], int], None] | None = None,
    ) -> None:
        self.model = model
        self.before_forward = before_forward  # (token histories, new tokens per history), e.g. routing prediction
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.members: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._pads: list[int] = []  # left padding of each member in the padded cache
        self._mask_BL: torch.Tensor | None = None

    # ---- membership -----------------------------------------------------------------------------

    def prefill(self, seq: Sequence) -> None:
        """Run `seq`'s prompt alone, sample its first token, keep its cache; it is not a member yet."""
        if seq.params.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else 0)
        cache = DynamicCache(config=self.model.config)
        if self.before_forward is not None:
            self.before_forward([seq.prompt_ids], len(seq.prompt_ids))
        logits_1V = self._forward(torch.tensor([seq.prompt_ids], device=self.device), cache)
        seq.kv = [(layer.keys, layer.values) for layer in cache.layers]
        seq.t_first_token = time.perf_counter()
        self._accept(seq, sample_next(logits_1V[0], seq.params, seq.generator))

    def add(self, seq: Sequence) -> None:
        assert seq.kv is not None and not seq.done
        self._unpad()
        self.members.append(seq)

    def remove(self, seq: Sequence) -> None:
        self._unpad()
        self.members.remove(seq)

    def evict_finished(self) -> list[Sequence]:
        finished = [s for s in self.members if s.done]
        if finished:
            self._unpad()
            self.members = [s for s in self.members if not s.done]
            for s in finished:
                s.kv = None
        return finished

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> None:
        """One new token for every member."""
        if not self.members:
            return
        if self._cache is None:
            self._pad()
        B = len(self.members)
        last_B1 = torch.tensor([[s.generated[-1]] for s in self.members], device=self.device)
        positions_B1 = torch.tensor([[s.length - 1] for s in self.members], device=self.device)
        self._mask_BL = torch.cat([self._mask_BL, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
        if self.before_forward is not None:
            self.before_forward([s.prompt_ids + s.generated for s in self.members], 1)
        logits_BV = self._forward(last_B1, self._cache, attention_mask=self._mask_BL, position_ids=positions_B1)
        for b, seq in enumerate(self.members):
            self._accept(seq, sample_next(logits_BV[b], seq.params, seq.generator))

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache, **kw: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, :].float()

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
        if seq.done:
            seq.t_done = time.perf_counter()

    # ---- padded cache ---------------------------------------------------------------------------

    def _pad(self) -> None:
        """Left-pad every member's cache to the longest and stack them into one batched cache."""
        lengths = [s.kv[0][0].shape[-2] for s in self.members]
        longest = max(lengths)
        self._pads = [longest - n for n in lengths]
        layers = []
        for i in range(len(self.members[0].kv)):
            keys = [_left_pad(s.kv[i][0], p) for s, p in zip(self.members, self._pads)]
            values = [_left_pad(s.kv[i][1], p) for s, p in zip(self.members, self._pads)]
            layers.append((torch.cat(keys), torch.cat(values)))
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._mask_BL = torch.tensor([[0] * p + [1] * n for p, n in zip(self._pads, lengths)], device=self.device)
        for s in self.members:
            s.kv = None  # the batched cache is the only copy while it exists

    def _unpad(self) -> None:
        """Give every member its own unpadded cache back (views into the batched one)."""
        if self._cache is None:
            return
        for b, (seq, pad) in enumerate(zip(self.members, self._pads)):
            seq.kv = [
                (layer.keys[b : b + 1, :, pad:], layer.values[b : b + 1, :, pad:]) for layer in self._cache.layers
            ]
        self._cache = None
        self._mask_BL = None


def _left_pad(t_1hLd: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return t_1hLd
    zeros = t_1hLd.new_zeros(*t_1hLd.shape[:-2], pad, t_1hLd.shape[-1])
    return torch.cat([zeros, t_1hLd], dim=-2)
