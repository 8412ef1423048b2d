"""The composition root: engines, predictors and admission policies built from configuration.

`moeflow.load` lives here because a predictive engine is an engine plus a predictor applied to it
(`moeflow.predictor.apply_prediction`); the engine itself knows nothing of predictors.
"""

from __future__ import annotations

from pathlib import Path

from moeflow.config import Admission, EngineConfig, check_choice
from moeflow.engine import Engine
from moeflow.errors import MoeflowError
from moeflow.offload.policy import AutoPolicy, PredictivePolicy
from moeflow.offload.reuse import LearnedReuse, ReuseModel, reuse_files
from moeflow.predictor.ahead import apply_next_token_prefetch
from moeflow.predictor.apply import (
    apply_prediction,
    available_predictors,
    best_predictor,
    build_predictor,
    engine_predictor_dir,
    routing_shape,
)
from moeflow.predictor.rebatch import RebatchAdmission
from moeflow.scheduler import AdmissionPolicy, FifoAdmission


def load(path: str | Path | None = None, **options: object) -> Engine:
    """Load a Hugging Face MoE checkpoint (default: the shipped model) with its experts offloaded.

    Options are `EngineConfig` fields (expert_budget, store, policy, predictor, ...).
    """
    unknown = set(options) - set(EngineConfig.field_names())
    if unknown:
        raise MoeflowError(f"unknown option(s) {sorted(unknown)}; valid: {EngineConfig.field_names()}")
    config = EngineConfig(**options)
    engine = Engine(path, config)
    try:
        if config.policy == "predictive":
            name = config.predictor
            if name == "auto":
                name = best_predictor(available_predictors(engine.checkpoint.path, engine_predictor_dir(engine)))
            predictor = build_predictor(engine, name, lookahead=config.lookahead)
            apply_prediction(engine, predictor)
            if config.next_token_prefetch:
                apply_next_token_prefetch(engine, predictor)
        if config.reuse_model and isinstance(engine.cache.policy, (PredictivePolicy, AutoPolicy)):
            apply_reuse_model(engine)  # (with a slot for every expert the auto policy is not used: nothing to evict)
    except BaseException:
        engine.close()
        raise
    return engine


def apply_reuse_model(engine: Engine) -> bool:
    """Evict by the reuse model trained for `engine`'s model (the predictive policy's estimate, one of the auto
    policy's candidates), if its predictor folder holds one; whether it does."""
    folder = engine_predictor_dir(engine)
    if not reuse_files(folder)[0].is_file():
        return False
    shape = routing_shape(engine)
    model = ReuseModel.load(folder, layers=shape.layers, num_experts=shape.num_experts)
    policy = engine.cache.policy
    assert isinstance(policy, (PredictivePolicy, AutoPolicy)), "the reuse model is an estimate of these policies"
    policy.estimate_with(LearnedReuse(model))
    return True


def make_admission(name: str, engine: Engine, **rebatch: int) -> AdmissionPolicy:
    """The admission policy called `name`: "fifo", or "rebatch" (the token re-batcher, with `RebatchAdmission`'s
    options `rebatch`)."""
    check_choice(name, Admission, "admission policy")
    if name == "rebatch":
        return RebatchAdmission.for_engine(engine, **rebatch)
    return FifoAdmission()
