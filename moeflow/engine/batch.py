"""Decode many sequences together with exact per-sequence results.

Each sequence is prefilled alone (so its prompt sees exactly the solo computation) and keeps its
own KV cache. A `DecodeBatch` runs one token for all its members in one forward: their caches are
left-padded to a common length and the pads masked, with explicit position ids, so every
sequence's tokens equal its solo greedy generation. Members can join and leave between steps
(continuous batching); the padded cache is rebuilt only when membership changes.
Every forward goes through the engine's `StepDriver`. Shapes: the legend in `moeflow`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from moeflow.config import SamplingParams
from moeflow.engine.driver import ForwardResult, StepDriver
from moeflow.engine.sampling import sample_next

_ids = itertools.count()


@dataclass(eq=False)
class SequenceState:
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

    def __init__(self, driver: StepDriver, eos_token_ids: set[int]) -> None:
        self.driver = driver
        self.device = driver.device
        self.eos_token_ids = eos_token_ids
        self.members: list[SequenceState] = []
        self._cache: DynamicCache | None = None
        self._pads: list[int] = []  # left padding of each member in the padded cache
        self._mask_BQ: torch.Tensor | None = None

    # ---- membership -----------------------------------------------------------------------------

    def prefill(self, seq: SequenceState) -> None:
        """Run `seq`'s prompt alone, sample its first token, keep its cache; it is not a member yet."""
        if seq.params.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else 0)
        cache = DynamicCache(config=self.driver.model.config)
        ids_1T = torch.tensor([seq.prompt_ids], device=self.device)
        result = self.driver.forward(ids_1T, histories=[seq.prompt_ids], n_new=len(seq.prompt_ids), kv=cache)
        seq.kv = [(layer.keys, layer.values) for layer in cache.layers]
        seq.t_first_token = time.perf_counter()
        self._accept(seq, sample_next(result.logits_BV[0], seq.params, seq.generator))

    def add(self, seq: SequenceState) -> None:
        assert seq.kv is not None and not seq.done
        self._unpad()
        self.members.append(seq)

    def remove(self, seq: SequenceState) -> None:
        self._unpad()
        self.members.remove(seq)

    def evict_finished(self) -> list[SequenceState]:
        finished = [s for s in self.members if s.done]
        if finished:
            self._unpad()
            self.members = [s for s in self.members if not s.done]
            for s in finished:
                s.kv = None
        return finished

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> ForwardResult | None:
        """One new token for every member; the forward's result (its routing), None without members."""
        if not self.members:
            return None
        if self._cache is None:
            self._pad()
        B = len(self.members)
        last_B1 = torch.tensor([[s.generated[-1]] for s in self.members], device=self.device)
        positions_B1 = torch.tensor([[s.length - 1] for s in self.members], device=self.device)
        self._mask_BQ = torch.cat([self._mask_BQ, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
        result = self.driver.forward(
            last_B1,
            histories=[s.prompt_ids + s.generated for s in self.members],
            n_new=1,
            kv=self._cache,
            attention_mask_BQ=self._mask_BQ,
            position_ids_BT=positions_B1,
        )
        for b, seq in enumerate(self.members):
            self._accept(seq, sample_next(result.logits_BV[b], seq.params, seq.generator))
        return result

    def _accept(self, seq: SequenceState, token: int) -> None:
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
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.driver.model.config)
        self._mask_BQ = torch.tensor([[0] * p + [1] * n for p, n in zip(self._pads, lengths)], device=self.device)
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
        self._mask_BQ = None


def _left_pad(t_1hQd: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return t_1hQd
    zeros = t_1hQd.new_zeros(*t_1hQd.shape[:-2], pad, t_1hQd.shape[-1])
    return torch.cat([zeros, t_1hQd], dim=-2)
