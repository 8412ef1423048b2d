"""Decode many sequences together with exact per-sequence results.

Each sequence is prefilled alone (so its prompt sees exactly the solo computation) and keeps its
own KV cache. A `DecodeBatch` runs one token for all its members in one forward: their caches are
left-padded to a common length and the pads masked, with explicit position ids, so every
sequence's tokens equal its solo greedy generation. Members can join and leave between steps
(continuous batching, the token re-batcher): at the next step only the rows that changed are
touched — leavers get their own unpadded copy and are dropped from the batched cache, joiners are
padded to its length and appended (or the batch is left-extended when a joiner is longer); the
rows that stay are never re-padded. Every forward goes through the engine's `StepDriver`. Shapes:
the legend in `moeflow`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from moeflow.config import SamplingParams
from moeflow.engine.detok import TextStream
from moeflow.engine.driver import ForwardResult, StepDriver
from moeflow.engine.sampling import SeenTokens, TokenLogprob, sample_next, token_logprob
from moeflow.errors import MoeflowError

_ids = itertools.count()


@dataclass(eq=False)
class SequenceState:
    """One request's state across prefill and decode steps."""

    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error", None while running
    error: Exception | None = None  # why this sequence failed (finish_reason "error"; see `fail`)
    # per layer [1, heads, L, d], no padding; or, for a cache that is more than attention keys and values
    # (linear-attention or SSM state, sliding windows, a family's own cache class), the Cache itself
    kv: list[tuple[torch.Tensor, torch.Tensor]] | Cache | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token when `params.logprobs` is set
    stop_text: TextStream | None = None  # the text watched for `params.stop` (set by `DecodeBatch.prefill`)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_done: float | None = None
    seen: SeenTokens = field(init=False, repr=False)  # the history, as the repetition penalty reads it

    def __post_init__(self) -> None:
        # Engine.new_sequence resolves against the model's defaults; a sequence built directly gets neutral ones.
        self.params = self.params.resolve({})
        self.seen = SeenTokens(self.history)  # kept up to date as tokens come

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def history(self) -> TokenHistory:
        """The prompt and the generated tokens as one sequence, without copying either."""
        return TokenHistory(self.prompt_ids, self.generated)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: Exception) -> None:
        """End this sequence with `error` (its prefill or sampling raised, or a decode forward it shared);
        the sequences decoding with it are not touched."""
        self.finish_reason = "error"
        self.error = error
        self.kv = None
        self.t_done = time.perf_counter()


class TokenHistory(Sequence[int]):
    """`prompt + generated` read in place: a slice of the tail costs the slice, not the whole history."""

    __slots__ = ("_generated", "_prompt")

    def __init__(self, prompt: list[int], generated: list[int]) -> None:
        self._prompt = prompt
        self._generated = generated

    def __len__(self) -> int:
        return len(self._prompt) + len(self._generated)

    def __getitem__(self, i: int | slice) -> int | list[int]:  # type: ignore[override]
        P = len(self._prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return list(self)[i]
            return self._prompt[start:stop] + self._generated[max(start - P, 0) : max(stop - P, 0)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("history index out of range")
        return self._prompt[i] if i < P else self._generated[i - P]

    def __iter__(self) -> Iterator[int]:
        yield from self._prompt
        yield from self._generated


class DecodeBatch:
    """The sequences decoding together, and their padded KV cache.

    `members` are the sequences the next `step` decodes; `_rows` the sequences whose caches the
    batched cache holds, row by row. `add` and `remove` change `members` only; `step` first brings
    the batched cache in line (`_sync`), touching only the rows that differ.
    """

    def __init__(self, driver: StepDriver, eos_token_ids: set[int], tokenizer: object | None = None) -> None:
        self.driver = driver
        self.device = driver.device
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer  # decodes the text that stop strings are looked for in
        self.members: list[SequenceState] = []
        self._rows: list[SequenceState] = []  # row b of the batched cache holds _rows[b]'s cache
        self._cache: DynamicCache | None = None
        self._mask_BQ: torch.Tensor | None = None  # 0 on each row's left padding
        self._pads: list[int] = []  # each row's left padding

    # ---- membership -----------------------------------------------------------------------------

    def prefill(self, seq: SequenceState) -> None:
        """Run `seq`'s prompt alone, sample its first token, keep its cache; it is not a member yet."""
        self._start(seq)
        ids_1T = torch.tensor([seq.prompt_ids], device=self.device)
        n, kv = len(seq.prompt_ids), self.driver.new_cache()
        result = self.driver.forward(ids_1T, histories=[seq.prompt_ids], n_new=n, kv=kv, use_cache=True)
        cache = result.cache
        seq.kv = [(layer.keys, layer.values) for layer in cache.layers] if _is_plain(cache) else cache
        seq.t_first_token = time.perf_counter()
        self._sample(seq, result.logits_BV[0])

    def prefill_many(self, seqs: Sequence[SequenceState]) -> int:
        """Prefill `seqs` in one forward: their prompts left-padded to the longest, the pads masked, with
        explicit position ids (as a decode step's rows), so each expert is read once for all of them instead
        of once per prompt. Each sequence then keeps its own unpadded cache and first token, as `prefill`
        gives. A cache that cannot be split by rows (recurrent or windowed state) prefills one by one. If the
        shared forward fails, each sequence is prefilled alone, and one whose own prefill fails is failed
        (`SequenceState.fail`): the failure stays with the sequence that caused it. Returns how many sequences'
        prefill forwards raised (a sampling failure is the sequence's own, not counted)."""
        kv = self.driver.new_cache()
        if len(seqs) == 1 or kv is None or not _is_plain(kv):
            return sum(not self._prefill_alone(seq) for seq in seqs)
        for seq in seqs:
            self._start(seq)
        lengths = [len(s.prompt_ids) for s in seqs]
        T = max(lengths)
        pad_id = seqs[0].prompt_ids[0]  # any token: a pad is masked out of every real position's attention
        ids_BT = torch.tensor([[pad_id] * (T - n) + s.prompt_ids for s, n in zip(seqs, lengths)], device=self.device)
        mask_BT = torch.tensor([[0] * (T - n) + [1] * n for n in lengths], device=self.device)
        positions_BT = (mask_BT.cumsum(dim=1) - 1).clamp(min=0)
        try:
            result = self.driver.forward(ids_BT, histories=ids_BT.tolist(), n_new=T, kv=kv, use_cache=True,
                                         attention_mask_BQ=mask_BT, position_ids_BT=positions_BT)
        except Exception:
            return sum(not self._prefill_alone(seq) for seq in seqs)
        now = time.perf_counter()
        for b, (seq, n) in enumerate(zip(seqs, lengths)):
            seq.kv = [(layer.keys[b : b + 1, :, T - n :].clone(), layer.values[b : b + 1, :, T - n :].clone())
                      for layer in result.cache.layers]
            seq.t_first_token = now
            self._sample(seq, result.logits_BV[b])
        return 0

    def _prefill_alone(self, seq: SequenceState) -> bool:
        """`prefill`; False when its forward raised (the sequence is failed with that error)."""
        try:
            self.prefill(seq)
        except Exception as e:  # a prefill is this sequence's own forward: it alone fails
            seq.fail(e)
            return False
        return True

    def _start(self, seq: SequenceState) -> None:
        """A sequence's sampling state before its first token."""
        if seq.params.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else 0)
        if seq.params.stop:
            assert self.tokenizer is not None, "stop strings need a tokenizer (Engine.new_sequence checks)"
            seq.stop_text = TextStream(self.tokenizer, seq.params.stop)
        if seq.params.logprobs is not None:
            seq.logprobs = []

    def add(self, seq: SequenceState) -> None:
        assert (seq.kv is not None or seq in self._rows) and not seq.done
        self.members.append(seq)

    def remove(self, seq: SequenceState) -> None:
        self.members.remove(seq)

    def evict_finished(self) -> list[SequenceState]:
        finished = [s for s in self.members if s.done]
        if finished:
            self.members = [s for s in self.members if not s.done]
            for s in finished:
                s.kv = None
            if not self.members:  # nobody decodes next: free the batched cache now, not at the next step
                self._sync()
        return finished

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> ForwardResult | None:
        """One new token for every member; the forward's result (its routing), None without members."""
        self._sync()
        if not self.members:
            return None
        B = len(self.members)
        last_B1 = torch.tensor([[s.generated[-1]] for s in self.members], device=self.device)
        positions_B1 = torch.tensor([[s.length - 1] for s in self.members], device=self.device)
        self._mask_BQ = torch.cat([self._mask_BQ, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
        result = self.driver.forward(
            last_B1,
            histories=[s.history for s in self.members],
            n_new=1,
            kv=self._cache,
            attention_mask_BQ=self._mask_BQ,
            position_ids_BT=positions_B1,
        )
        for b, seq in enumerate(self.members):
            self._sample(seq, result.logits_BV[b])
        return result

    def _sample(self, seq: SequenceState, logits_V: torch.Tensor) -> None:
        try:
            token = sample_next(logits_V, seq.params, seq.generator, seq.seen)
        except Exception as e:  # this sequence's own sampling: it alone fails, the batch goes on
            seq.fail(e)
            return
        if seq.logprobs is not None:
            seq.logprobs.append(token_logprob(logits_V, token, seq.params.logprobs))
        self._accept(seq, token)

    def _accept(self, seq: SequenceState, token: int) -> None:
        seq.generated.append(token)
        if token in self.eos_token_ids or _completes_stop(seq, token):
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
        if seq.done:
            seq.t_done = time.perf_counter()

    # ---- padded cache ---------------------------------------------------------------------------

    def _sync(self) -> None:
        """Make the batched cache hold exactly `members`' caches (row order = `members` order).

        Rows that stay are copied once by `index_select` (not at all when nobody left), never
        re-padded; a leaver still running gets its own unpadded copy (finished and cancelled ones
        are dropped); joiners are left-padded to the batch's length and appended, the batch itself
        left-extended first when a joiner is longer. Columns that are padding in every row go.
        """
        member_ids = {id(s) for s in self.members}
        if len(self._rows) == len(self.members) and member_ids == {id(s) for s in self._rows}:
            self.members = list(self._rows)  # nothing changed: the cache's row order
            return
        row_ids = {id(s) for s in self._rows}
        keep = [b for b, s in enumerate(self._rows) if id(s) in member_ids]
        for b, s in enumerate(self._rows):
            if id(s) not in member_ids and not s.done:
                s.kv = self._own_copy(b)
        joiners = [s for s in self.members if id(s) not in row_ids]
        if any(isinstance(s.kv, Cache) for s in joiners) or (self._cache is not None and not _is_plain(self._cache)):
            self._adopt_whole(keep, joiners)
            return
        layers, mask_BQ, pads = self._kept(keep)
        if joiners:
            lengths = [s.kv[0][0].shape[-2] for s in joiners]
            Q = max([mask_BQ.shape[1] if keep else 0, *lengths])
            if keep and Q > mask_BQ.shape[1]:  # a joiner is longer than the batch: left-extend the rows kept
                grow = Q - mask_BQ.shape[1]
                layers = [(_left_pad(k, grow), _left_pad(v, grow)) for k, v in layers]
                mask_BQ = F.pad(mask_BQ, (grow, 0))
                pads = [p + grow for p in pads]
            grown = []
            for i in range(len(joiners[0].kv)):
                ks = [_left_pad(s.kv[i][0], Q - n) for s, n in zip(joiners, lengths)]
                vs = [_left_pad(s.kv[i][1], Q - n) for s, n in zip(joiners, lengths)]
                if keep:
                    ks.insert(0, layers[i][0])
                    vs.insert(0, layers[i][1])
                grown.append((torch.cat(ks), torch.cat(vs)))
            layers = grown
            joined_mask = torch.tensor([[0] * (Q - n) + [1] * n for n in lengths], device=self.device)
            mask_BQ = torch.cat([mask_BQ, joined_mask]) if keep else joined_mask
            pads += [Q - n for n in lengths]
            for s in joiners:
                s.kv = None  # the batched cache is the only copy while it exists
        self._rows = [self._rows[b] for b in keep] + joiners
        self.members = list(self._rows)
        self._pads = pads
        self._mask_BQ = mask_BQ if self._rows else None
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.driver.model.config) if self._rows else None

    def _adopt_whole(self, keep: list[int], joiners: list[SequenceState]) -> None:
        """A cache that cannot be padded or split row by row (recurrent state, sliding windows, a family's
        own cache class) serves one sequence at a time: the batch holds the one member's own cache."""
        if len(keep) + len(joiners) > 1:
            raise MoeflowError(
                f"{self.driver.model.config.model_type} keeps a cache that is more than attention keys and values "
                "(recurrent or windowed state), which moeflow cannot pad into a batch yet; decode its sequences "
                "one at a time (batch size 1)"
            )
        if joiners:
            seq = joiners[0]
            self._cache, seq.kv = seq.kv, None
            self._mask_BQ = torch.ones(1, seq.length - 1, dtype=torch.long, device=self.device)
            self._pads = [0]
            self._rows = [seq]
        elif not keep:
            self._cache, self._mask_BQ, self._pads, self._rows = None, None, [], []
        self.members = list(self._rows)

    def _kept(self, keep: list[int]) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor | None, list[int]]:
        """Rows `keep` of the batched cache (per layer keys, values), their mask and left pads, without
        the columns that are padding in every kept row; nothing when no row is kept."""
        if not keep:
            return [], None, []
        layers = [(layer.keys, layer.values) for layer in self._cache.layers]
        mask_BQ = self._mask_BQ
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, device=self.device)
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
            mask_BQ = mask_BQ.index_select(0, index)
        pads = [self._pads[b] for b in keep]
        trim = min(pads)
        if trim:
            layers = [(k[:, :, trim:], v[:, :, trim:]) for k, v in layers]
            mask_BQ = mask_BQ[:, trim:]
            pads = [p - trim for p in pads]
        return layers, mask_BQ, pads

    def _own_copy(self, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row `b`'s cache without its padding, in tensors of its own (not views pinning the batch); a cache
        that serves one sequence (`_adopt_whole`) goes back to that sequence whole."""
        if not _is_plain(self._cache):
            return self._cache
        pad = self._pads[b]
        return [
            (layer.keys[b : b + 1, :, pad:].clone(), layer.values[b : b + 1, :, pad:].clone())
            for layer in self._cache.layers
        ]


def _completes_stop(seq: SequenceState, token: int) -> bool:
    """Whether `token` completes one of `seq`'s stop strings (decoding on this thread, only for such requests)."""
    if seq.stop_text is None:
        return False
    seq.stop_text.push([token])
    return seq.stop_text.stopped


def _is_plain(cache: Cache) -> bool:
    """A DynamicCache of full-attention layers only: keys and values that can be padded into a batch."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(t_BhQd: torch.Tensor, pad: int) -> torch.Tensor:
    """`pad` zero positions before the first cached one (dim -2)."""
    return F.pad(t_BhQd, (0, 0, pad, 0)) if pad else t_BhQd
