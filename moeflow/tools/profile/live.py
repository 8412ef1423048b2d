"""Live: the real engine run token by token over a trace, to measure what replay predicts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeflow.build import load
from moeflow.config import ProfileConfig
from moeflow.engine import Engine
from moeflow.offload.stats import CacheStats
from moeflow.tools.profile.replay import RunResult
from moeflow.tools.profile.report import RunRecord
from moeflow.tools.profile.setting import BudgetPoint, Geometry, policy_runs
from moeflow.tools.trace import Trace


@torch.inference_mode()
def live_run(engine: Engine, trace: Trace, *, progress: bool = False) -> tuple[CacheStats, np.ndarray, float]:
    """Run `engine` token by token over `trace`'s sequences (teacher-forced decode with a KV cache).

    Each sequence is prefilled with its first token, then fed its true next tokens one at a time,
    so every forward is one decode step. Returns the cache statistics, the routing the engine saw
    (int16 [N, L, K], to compare with the trace) and the wall time.
    """
    from transformers import DynamicCache

    layers = engine.checkpoint.moe_layers
    pos_of = {layer: i for i, layer in enumerate(layers)}
    seen_NLK = np.zeros((trace.num_tokens, len(layers), engine.top_k), dtype=np.int16)
    token_ids, seq_ids = np.asarray(trace.token_ids), np.asarray(trace.seq_ids)
    starts = np.flatnonzero(np.r_[True, seq_ids[1:] != seq_ids[:-1]])
    ends = np.r_[starts[1:], len(seq_ids)]
    engine.cache.reset_stats()
    step = 0
    t0 = time.perf_counter()
    with tqdm(total=trace.num_tokens, desc="live", unit="tok", disable=not progress, leave=False) as bar:
        for a, b in zip(starts, ends):
            ids = token_ids[a:b].tolist()
            kv = DynamicCache(config=engine.model.config)
            for i, token in enumerate(ids):
                result = engine.driver.forward(torch.tensor([[token]]), histories=[ids[: i + 1]], n_new=1, kv=kv)
                for event in result.routing:
                    seen_NLK[step, pos_of[event.plan.layer]] = event.top_k_index_TK[0].numpy()
                step += 1
                bar.update(1)
    engine.settle()
    return engine.cache.stats(), seen_NLK, time.perf_counter() - t0


def live_records(
    model: str | Path,
    trace: Trace,
    geometry: Geometry,
    config: ProfileConfig,
    *,
    policies: Sequence[str],
    predictors: Sequence[str],
    budgets: Sequence[BudgetPoint],
    links: dict[str, float],
    progress: bool = False,
) -> list[RunRecord]:
    """Every (policy, budget) but Belady's (the engine cannot know the future), run live on a freshly loaded engine."""
    records = []
    for policy, predictor in policy_runs([p for p in policies if p != "belady"], predictors):
        for budget in budgets:
            # prediction_trial off: the profile measures what the predictor does, on every step, as replay does;
            # and replay does not model the next token's reads ahead (`moeflow.predictor.ahead`), so neither does this,
            # nor read further ahead than the lookahead (as profiling's replay reads).
            options = dict(expert_budget=budget.spec, policy=policy, store=config.live_store,
                           lookahead=config.lookahead, prefetch_width=config.prefetch_width,
                           predictor_dir=config.predictor_dir, prediction_trial=False, next_token_prefetch=False,
                           read_ahead=config.lookahead, reuse_model=config.reuse_model)
            if predictor is not None:
                options["predictor"] = predictor
            with load(model, **options) as engine:
                stats, seen_NLK, seconds = live_run(engine, trace, progress=progress)
            run = RunResult(policy=policy, predictor=predictor, mode="live", budget=budget, tokens=trace.num_tokens,
                            stats=stats, prefetch=None, seconds=seconds)
            agreement = float((seen_NLK == np.asarray(trace.experts)).mean())
            records.append(run.record(geometry.expert_bytes, links, routing_agreement=agreement))
    return records
