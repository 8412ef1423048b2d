"""Perfect foresight, live: how fast the engine decodes when it knows the routing ahead exactly.

A contender of bench/expertflow.py, not a shipped predictor. The engine is exact, so every contender's greedy
decode of the bench's prompts routes the same way; `record_routing` decodes them once beforehand (the same
budget, store and policy as LRU's contender, hence the same arithmetic) and keeps every position's experts. In
the timed run, `attach_oracle` gives a predictive engine:

- a whole-step predictor that answers each step's routing before its forward with certainty (what a perfect
  next-token routing predictor, path's role, could offer);
- eviction that knows the next `horizon` tokens' routing (`bench/admission.py`'s horizon oracles, live): the
  victim is the expert used latest within the horizon, or not at all (least recently used among those);
- with a horizon of 2 tokens or more, the next token's first-layer experts offered during each decode step's last
  layer (the role of `moeflow.predictor.ahead`'s lens), with certainty.

With no horizon (`None`) it plays the shipped predictors' part alone: certain answers where path and the lens
answer, eviction left to the engine's trained reuse model as path's contender has it. Against path, that is
what a perfect routing predictor would add; against the horizons, what eviction's foresight adds.

What it measures: the tokens/s a predictor of one token (and of several) could reach in this engine on this
machine, against the predictors the engine ships. It cannot know beyond the end of a prompt's decode (the next
prompt's routing is unknown to it, as to any predictor). Each forward's real routing is checked against the
recorded one (`RoutingForesight.disagreements`).

Shape legend: N positions of a sequence (prompt + generated, the last generated token never fed), L MoE layers,
K top-k, E experts of a layer, T rows x new tokens of a forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

_SURE = 20.0  # a score whose sigmoid is 1 in float32: what `use_probabilities` makes of path-like logits


def record_routing(model: Path, prompts: Sequence[Sequence[int]], tokens: int, budget: str) -> list[dict]:
    """Each prompt's greedy decode as the bench's contenders run it (one at a time, `tokens` new tokens, LRU at
    `budget` from disk): its token ids (prompt + generated) and every fed position's top-k experts [N, L, K]."""
    import moeflow

    with moeflow.load(model, expert_budget=budget, store="disk", policy="lru") as engine:
        layers = list(engine.checkpoint.moe_layers)
        record: dict[int, list[list[list[int]]]] = {layer: [] for layer in layers}
        subscription = engine.runtime.routing.subscribe(
            lambda e: record[e.plan.layer].extend(e.top_k_index_TK.tolist())
        )
        out = []
        try:
            for prompt in prompts:
                for rows in record.values():
                    rows.clear()
                seq = engine.new_sequence(list(prompt), max_new_tokens=tokens)
                batch = engine.new_batch()
                batch.prefill(seq)
                batch.add(seq)
                while not seq.done:
                    batch.step()
                ids = list(seq.prompt_ids) + list(seq.generated)
                experts_LNK = [record[layer] for layer in layers]
                assert all(len(rows) == len(ids) - 1 for rows in experts_LNK), "one routing per fed position"
                out.append({"tokens": ids, "experts_NLK": np.array(experts_LNK).transpose(1, 0, 2).tolist()})
        finally:
            subscription.close()
    return out


class RoutingForesight:
    """The recorded sequences, and where the engine's running forward is in one of them."""

    def __init__(self, sequences: Sequence[dict], layers: Sequence[int], num_experts: int) -> None:
        self.tokens = [list(s["tokens"]) for s in sequences]
        self.experts_NLK = [np.asarray(s["experts_NLK"], dtype=np.int64) for s in sequences]
        self.pos_of = {layer: i for i, layer in enumerate(layers)}
        self.num_experts = num_experts
        self.seq = -1  # the sequence being decoded
        self.start = self.end = 0  # the running forward's positions [start, end)
        self.disagreements = 0  # routing events whose experts differ from the record's

    def locate(self, history: Sequence[int], n_new: int) -> None:
        """The forward about to run computes the last `n_new` positions of `history` (one row: the bench decodes one
        sequence at a time)."""
        n = len(history)
        if not (0 <= self.seq and self.tokens[self.seq][:n] == list(history)):
            found = [i for i, t in enumerate(self.tokens) if t[:n] == list(history)]
            if not found:
                raise RuntimeError("the oracle holds no recorded sequence this decode follows: record it again")
            self.seq = found[0]
        self.start, self.end = n - n_new, n

    def experts(self, pos: int) -> np.ndarray | None:
        """Position `pos`'s experts [L, K] in the current sequence; None past its last fed position."""
        e_NLK = self.experts_NLK[self.seq]
        return e_NLK[pos] if 0 <= pos < len(e_NLK) else None

    def check(self, layer: int, expert_ids_TK: np.ndarray) -> None:
        recorded = self.experts_NLK[self.seq][self.start : self.end, self.pos_of[layer]]
        if recorded.shape != expert_ids_TK.shape or not np.array_equal(
            np.sort(recorded, -1), np.sort(expert_ids_TK, -1)
        ):
            self.disagreements += 1


class OracleReuse:
    """`moeflow.offload.policy.ReuseEstimate` from the record: an expert used within the horizon is worth about 1
    (a little less the later its use), one not used 0. A layer that has not run in the current step counts this
    step and the `horizon - 1` after it; one that has, the next `horizon` (as `moeflow.offload.reuse`'s model)."""

    def __init__(self, foresight: RoutingForesight, horizon: int) -> None:
        self.foresight = foresight
        self.horizon = horizon
        self._ran: set[int] = set()  # layers that have run in the current step

    def begin_step(self, step: int) -> None:
        self._ran = set()

    def on_use(self, key: tuple[int, int], step: int) -> None:
        self._ran.add(key[0])

    def probabilities(self, keys: Sequence[tuple[int, int]]) -> list[float]:
        f = self.foresight
        e_NLK = f.experts_NLK[f.seq]
        out = []
        for layer, expert in keys:
            first = f.end if layer in self._ran else f.start
            window = e_NLK[first : f.end + self.horizon - (layer not in self._ran), f.pos_of[layer]]
            used = np.flatnonzero((window == expert).any(-1))
            out.append(0.0 if used.size == 0 else 1.0 - 0.01 * float(used[0]) / max(len(window), 1))
        return out


def attach_oracle(engine: object, sequences: Sequence[dict], horizon: int | None) -> RoutingForesight:
    """Give `engine` (policy 'predictive', loaded without a predictor's hooks) the recorded routing: certain
    predictions of each step, eviction with `horizon` tokens of foresight (None: by the trained reuse model) and,
    from 2 tokens (and with None), the next token's first-layer experts read during the last layer. Returns the
    foresight (its `disagreements` after the run)."""
    from moeflow.predictor.apply import apply_prediction, routing_shape
    from moeflow.predictor.base import RoutePredictor

    from moeflow.build import apply_reuse_model
    from moeflow.model.anatomy import moe_layer_parts

    shape = routing_shape(engine)
    layers = list(shape.layers)
    foresight = RoutingForesight(sequences, layers, shape.num_experts)
    prefetcher = engine.prefetcher
    assert prefetcher is not None, "the oracle feeds the predictive prefetcher"
    # Subscribed before the predictor's hooks, so that each forward is located before anything asks.
    closers = [
        engine.driver.before_forward.subscribe(lambda s: foresight.locate(s.histories[0], s.n_new)).close,
        engine.runtime.routing.subscribe(lambda e: foresight.check(e.plan.layer, e.top_k_index_TK.numpy())).close,
    ]

    class Oracle(RoutePredictor):
        name = "oracle"
        whole_step = True

        def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
            s_TLE = np.full((foresight.end - foresight.start, len(layers), shape.num_experts), -_SURE, np.float32)
            e_TLK = foresight.experts_NLK[foresight.seq][foresight.start : foresight.end]
            np.put_along_axis(s_TLE, e_TLK, _SURE, axis=-1)
            return s_TLE

    apply_prediction(engine, Oracle(shape))
    if horizon is None:
        if not apply_reuse_model(engine):
            raise RuntimeError("no trained reuse model next to the model: train one (moeflow predictor train)")
    else:
        engine.cache.policy.estimate_with(OracleReuse(foresight, horizon))
    if (horizon is None or horizon >= 2) and len(layers) >= 2:
        first = layers[0]

        def on_last_layer(module: object, args: tuple) -> None:
            if foresight.end - foresight.start != 1 or not prefetcher.predicting or not prefetcher.reads_dear:
                return
            nxt = foresight.experts(foresight.end)
            if nxt is not None:
                prefetcher.offer_next_step(first, [nxt[0].tolist()], [[1.0] * len(nxt[0])])

        closers.append(moe_layer_parts(engine.model, layers[-1]).norm.register_forward_pre_hook(on_last_layer).remove)
    for closer in closers:
        engine.on_close(closer)
    return foresight
