"""The token re-batcher: each step, decode the sequences whose next tokens need the same experts.

Under offloading a decode step costs roughly what its distinct experts cost to bring in, whatever
the number of tokens sharing them. The re-batcher keeps a pool of prefilled sequences larger than
the batch (`pool_factor` x batch size), predicts each one's next-token experts with a context
predictor (the routing-path network if trained, else the per-token table), and fills the batch
greedily: start from the sequence that has waited longest, then keep adding the one that brings
the fewest new experts. A sequence skipped `max_skips` steps in a row is taken first, so nobody
starves. Each sequence's tokens are still exactly its solo generation; only the grouping changes.

A member of a pool of `pool_factor` x batch decodes one step in `pool_factor` on average, so `max_skips`
must leave room above that or it, not the grouping, picks the batch: it defaults to 3 x `pool_factor`.
The pool is a throughput choice (`bench/rebatch_pool.py`: distinct experts per layer and step, which at 25%
is what a step reads, over the shipped model's held-out prompts, 256 x 32 tokens): B=32 FIFO 15.5, pool 4x
11.4, 8x with max_skips 8 13.3 (the skips chose, not the grouping), 8x with the default 24 10.1 (the pool is
then the whole job); B=8 FIFO 10.1, 4x 7.3, 8x 6.5, 32x 5.4. A larger pool also means each sequence waits
longer between its tokens, and keeps its KV cache that much longer.

The pool is refilled a batch at a time: new prompts wait until a batch's worth of places is free
(while the pool still fills a batch), so they prefill together in one forward. A prompt of a few
dozen tokens already touches most experts of every layer, so refilling place by place, as the pool's
staggered finishes free them, read nearly the whole model once per finished sequence: on the I/O-bound
model (B=8, 64 held-out prompts x 32 tokens) that took the re-batcher from 1.47x FIFO's tokens/s on the
first pool to 1.06x over the job (bench/expertflow.py --part rebatch).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moeflow.engine import Engine
from moeflow.engine.batch import SequenceState
from moeflow.errors import MoeflowError
from moeflow.scheduler import AdmissionPolicy

from .apply import available_predictors, build_predictor, engine_predictor_dir
from .base import RoutePredictor

# Predicted experts of each sequence's next token: bool [B, L, E].
RoutePredict = Callable[[list[SequenceState]], np.ndarray]

CONTEXT_PREDICTORS = ("path", "token_freq", "sklearn")  # preference order


def predicted_sets(predictor: RoutePredictor, top_k: int) -> RoutePredict:
    """Each sequence's next-token experts (top-k per layer) from a context predictor."""

    def predict(seqs: list[SequenceState]) -> np.ndarray:
        s_BLE = predictor.step_scores([s.history for s in seqs], 1)  # histories read in place, not copied
        best_BLK = np.argpartition(-s_BLE, top_k - 1, axis=-1)[..., :top_k]  # the top-k, in any order
        hot_BLE = np.zeros(s_BLE.shape, dtype=bool)
        np.put_along_axis(hot_BLE, best_BLK, True, axis=2)
        return hot_BLE

    return predict


class RebatchAdmission(AdmissionPolicy):
    name = "rebatch"

    def __init__(self, predict: RoutePredict, *, pool_factor: int = 8, max_skips: int | None = None) -> None:
        if max_skips is None:
            max_skips = 3 * pool_factor
        if pool_factor < 1 or max_skips < 1:
            raise MoeflowError("pool_factor and max_skips must be at least 1")
        self.predict = predict
        self.pool_factor = pool_factor
        self.max_skips = max_skips
        self._skips: dict[int, int] = {}  # seq_id -> consecutive steps left out

    @classmethod
    def for_engine(cls, engine: Engine, **options: int) -> RebatchAdmission:
        have = available_predictors(engine.checkpoint.path, engine_predictor_dir(engine))
        name = next((n for n in CONTEXT_PREDICTORS if n in have), None)
        if name is None:
            raise MoeflowError(
                f"the re-batcher needs a trained context predictor ({', '.join(CONTEXT_PREDICTORS)}) for "
                f"{engine.checkpoint.path} in {engine_predictor_dir(engine)}; run `moeflow predictor train --model "
                f"{engine.checkpoint.path} --out {engine_predictor_dir(engine)}`, or pass --predictor-dir FOLDER "
                "where you trained them"
            )
        return cls(predicted_sets(build_predictor(engine, name), engine.top_k), **options)

    def choose(self, waiting: list[SequenceState], active: list[SequenceState], free: int) -> list[SequenceState]:
        batch = max((len(active) + free) // self.pool_factor, 1)
        if free < min(batch, len(waiting)) and len(active) >= batch:
            return []  # wait for a batch's worth of places: one prefill forward for all of them (module docstring)
        return waiting[:free]

    def pool_size(self, max_batch_size: int) -> int:
        return self.pool_factor * max_batch_size

    def select(self, active: list[SequenceState], max_batch_size: int) -> list[SequenceState]:
        live = {s.seq_id for s in active}
        self._skips = {k: v for k, v in self._skips.items() if k in live}
        if len(active) <= max_batch_size:
            chosen = list(active)
        else:
            chosen = self._group(active, max_batch_size)
        picked = {s.seq_id for s in chosen}
        for s in active:
            self._skips[s.seq_id] = 0 if s.seq_id in picked else self._skips.get(s.seq_id, 0) + 1
        return [s for s in active if s.seq_id in picked]

    def _group(self, active: list[SequenceState], size: int) -> list[SequenceState]:
        sets_BLE = self.predict(active)
        skips = np.array([self._skips.get(s.seq_id, 0) for s in active])
        order = sorted(range(len(active)), key=lambda i: -skips[i])  # longest waiting first; stable = oldest
        chosen = [i for i in order if skips[i] >= self.max_skips][:size]
        if not chosen:
            chosen = [order[0]]
        union_LE = sets_BLE[chosen].any(axis=0)
        left = [i for i in order if i not in chosen]
        while len(chosen) < size:
            new_B = (sets_BLE[left] & ~union_LE).sum(axis=(1, 2))
            j = left.pop(int(np.argmin(new_B)))  # argmin takes the first: ties go to the longest waiting
            chosen.append(j)
            union_LE |= sets_BLE[j]
        return [active[i] for i in chosen]
