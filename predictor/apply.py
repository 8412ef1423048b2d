"""Applying routing predictors to an engine: `apply_prediction(engine, predictor)`, the pass behind
`--policy predictive`, and `PredictorHooks`, which feeds predictors from inside the forward.

`PredictorHooks` listens to the engine's step driver (each forward's token histories), to a forward
hook on the token embedding and pre-hooks on each MoE layer's pre-MoE norm (its input is the
residual after attention), and to the offload runtime's routing events. Each answer of a predictor
goes to a sink whole, as its target positions and their scores in one array: a whole-step
predictor's one fused pass (`step_scores`) as it is, without a tensor per layer. `apply_prediction`
ranks every target layer in one numpy pass and offers them to the engine's prefetcher in one call;
trace recording stores them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.engine import Engine
from moeflow.engine.driver import ForwardStart
from moeflow.errors import MoeflowError
from moeflow.model.anatomy import moe_layer_parts, token_embedding
from moeflow.offload.plans import RoutingEvent

from .base import RoutePredictor, RoutingShape, Scores, load_saved, predictor_dir, saved_files
from .predictors import PREDICTORS, FrequencyPredictor, GateLookahead

# One call per answer: the predictor, its target layer positions, and their scores [X, T, E] (X: the targets).
Sink = Callable[[RoutePredictor, Sequence[int], np.ndarray], None]


def routing_shape(engine: Engine) -> RoutingShape:
    ckpt = engine.checkpoint
    layers = tuple(ckpt.moe_layers)
    return RoutingShape(layers, int(ckpt.num_experts[layers[0]]), engine.top_k, int(engine.model.config.vocab_size))


def build_predictor(engine: Engine, name: str, *, lookahead: int = DEFAULT_LOOKAHEAD) -> RoutePredictor:
    """The predictor `name` for `engine`'s model: gate lookahead from its routers, others as trained."""
    if name not in PREDICTORS:
        raise MoeflowError(f"unknown predictor {name!r}; choose one of: {', '.join(PREDICTORS)}")
    shape = routing_shape(engine)
    cls = PREDICTORS[name]
    if issubclass(cls, GateLookahead):
        return cls.from_model(engine.model, shape, lookahead=lookahead)
    predictor = load_saved(cls, engine.checkpoint.path, shape, folder=engine_predictor_dir(engine))
    if predictor.lookahead != lookahead and name == "transition":
        raise MoeflowError(
            f"the transition predictor was trained for lookahead {predictor.lookahead}; "
            f"use --lookahead {predictor.lookahead} or train it again with --lookahead {lookahead}"
        )
    predictor.lookahead = lookahead
    return predictor


def engine_predictor_dir(engine: Engine) -> Path:
    """Where `engine` reads trained predictors: `EngineConfig.predictor_dir`, else next to its model."""
    folder = engine.config.predictor_dir
    return Path(folder) if folder is not None else predictor_dir(engine.checkpoint.path)


def available_predictors(model_dir: str | Path, folder: str | Path | None = None) -> list[str]:
    """Predictors usable for the model now: the training-free ones and those trained in `folder` (default: next
    to the model)."""
    folder = Path(folder) if folder is not None else predictor_dir(model_dir)
    return [n for n, cls in PREDICTORS.items() if not cls.trainable or saved_files(n, folder)[0].is_file()]


# Best first, by live decode speed on the I/O-bound bench model (bench/expertflow.py, 25%, disk): token_freq
# 1.14x LRU's tokens/s, gate 1.07x, path 0.77x on 2026-12-01 (token_freq 1.30x, path 1.17x in the run before);
# on 2026-12-03, 4 interleaved rounds, median of per-round ratios: token_freq 1.19x, path 1.15x, the auto policy
# without prediction 1.15x (bench/results/expertflow_iobound_preference.json), although path has the best recall
# (README: path 0.81, token_freq 0.72, sklearn 0.73 at 4x the cost, gate 0.65); gate needs no training, so one is
# always available.
PREFERENCE = ("token_freq", "path", "sklearn", "gate")


def best_predictor(have: Sequence[str]) -> str:
    """What `--predictor auto` means: the most accurate of the predictors in `have`."""
    return next((name for name in PREFERENCE if name in have), "gate")


class PredictorHooks:
    """Feeds `predictors` from inside `engine`'s forwards; their answers go to `sink`. `close()` detaches.
    While `active()` is False the predictors are not called at all (the hooks stay attached)."""

    def __init__(
        self,
        engine: Engine,
        predictors: Sequence[RoutePredictor],
        sink: Sink,
        *,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.predictors = list(predictors)
        self.sink = sink
        self.active = active
        self.seconds = {p.name: 0.0 for p in self.predictors}
        self._pos_of = {layer: i for i, layer in enumerate(engine.checkpoint.moe_layers)}
        # Each hook only where some predictor listens: a path predictor costs one call per forward,
        # not one per layer as well.
        self._stepping = [p for p in self.predictors if p.whole_step or self._overrides(p, "on_step")]
        self._residuals = [p for p in self.predictors if self._overrides(p, "on_residual")]
        self._routed = [p for p in self.predictors if self._overrides(p, "on_routing")]
        self._all_positions = tuple(range(len(self._pos_of)))
        model = engine.model
        self._handles = []
        if self._residuals:
            self._handles.append(token_embedding(model).register_forward_hook(self._on_embedding))
            for layer, pos in self._pos_of.items():
                norm = moe_layer_parts(model, layer).norm
                self._handles.append(norm.register_forward_pre_hook(self._residual_hook(pos)))
        self._subscriptions = []
        if self._stepping:
            self._subscriptions.append(engine.driver.before_forward.subscribe(self._on_forward))
        if self._routed:
            self._subscriptions.append(engine.runtime.routing.subscribe(self._on_routing))

    @staticmethod
    def _overrides(predictor: RoutePredictor, hook: str) -> bool:
        """Whether `predictor`'s class answers `hook` (the base class answers nothing)."""
        return getattr(type(predictor), hook) is not getattr(RoutePredictor, hook)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for s in self._subscriptions:
            s.close()

    def _emit(self, predictor: RoutePredictor, answer: Callable[[], Scores]) -> None:
        t0 = time.perf_counter()
        scores = answer()
        self.seconds[predictor.name] += time.perf_counter() - t0
        if len(scores) == 1:  # a per-layer predictor's usual answer: one target
            ((target, s_TE),) = scores.items()
            self.sink(predictor, (target,), _as_array(s_TE)[None])
        elif scores:
            self.sink(predictor, list(scores), np.stack([_as_array(v) for v in scores.values()]))

    def _on_forward(self, start: ForwardStart) -> None:
        if not self.active():
            return
        for p in self._stepping:
            if p.whole_step:  # one fused pass for every layer, as it comes
                t0 = time.perf_counter()
                s_TLE = p.step_scores(start.histories, start.n_new)
                self.seconds[p.name] += time.perf_counter() - t0
                self.sink(p, self._all_positions, s_TLE.transpose(1, 0, 2))
            else:
                self._emit(p, lambda p=p: p.on_step(start.histories, start.n_new))

    def _on_embedding(self, module: object, args: object, out: torch.Tensor) -> None:
        self._residual(-1, out)

    def _residual_hook(self, pos: int) -> Callable:
        def hook(module: object, args: tuple) -> None:
            self._residual(pos, args[0])

        return hook

    def _residual(self, pos: int, hidden: torch.Tensor) -> None:
        if not self.active():
            return
        r_TD = hidden.reshape(-1, hidden.shape[-1])
        for p in self._residuals:
            self._emit(p, lambda p=p: p.on_residual(pos, r_TD))

    def _on_routing(self, event: RoutingEvent) -> None:
        if not self.active():
            return
        pos = self._pos_of[event.plan.layer]
        for p in self._routed:
            self._emit(p, lambda p=p: p.on_routing(pos, event.top_k_index_TK))


def _as_array(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    if not isinstance(scores, torch.Tensor):
        return np.asarray(scores, dtype=np.float32)
    if scores.dtype is torch.float32 and scores.device.type == "cpu" and not scores.requires_grad:
        return scores.numpy()  # what predictors answer: no conversion to pay for
    return scores.detach().to("cpu", torch.float32).numpy()


def use_probabilities(predictor: RoutePredictor, scores_XE: np.ndarray, top_k: int) -> np.ndarray:
    """[..., E] float32: `predictor`'s scores as the probability that each expert is among a token's top-k.

    What a score means depends on the predictor: per-expert classifier logits (path, sklearn: the
    sigmoid), a router's logits (gate: its softmax x top-k, capped at 1), or counts of past routing
    (frequency, token_freq, transition: normalised to top-k per token). These are the predictor's own
    beliefs; the prefetcher calibrates them online against what the layers really use.
    """
    s_XE = np.asarray(scores_XE, dtype=np.float32)
    if isinstance(predictor, GateLookahead):
        e_XE = np.exp(s_XE - s_XE.max(-1, keepdims=True))
        return np.minimum(e_XE * (top_k / e_XE.sum(-1, keepdims=True)), 1.0)
    if isinstance(predictor, FrequencyPredictor):
        return np.clip(s_XE * (top_k / np.maximum(s_XE.sum(-1, keepdims=True), 1e-12)), 0.0, 1.0)
    return expit(s_XE)


def ranked_probabilities(
    predictor: RoutePredictor, scores_XE: np.ndarray, m: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `m` best experts per row by score [..., M] (ties to the lower id) and their probabilities of use
    [..., M] (`use_probabilities`); any leading dimensions (tokens, or layers x tokens). In numpy, a handful of
    calls for all of them: a gather by flat index, as `take_along_axis` costs several times more on so few."""
    s_XE = np.asarray(scores_XE, dtype=np.float32)
    E = s_XE.shape[-1]
    s_RE = s_XE.reshape(-1, E)
    ranked_RM = np.argsort(-s_RE, axis=-1, kind="stable")[:, :m]
    rows_R1 = np.arange(len(s_RE))[:, None]
    if isinstance(predictor, (GateLookahead, FrequencyPredictor)):  # probabilities from the whole row
        probs_RM = use_probabilities(predictor, s_RE, top_k)[rows_R1, ranked_RM]
    else:  # one score's alone (the sigmoid): only the m taken are converted
        probs_RM = expit(s_RE[rows_R1, ranked_RM])
    shape = (*s_XE.shape[:-1], ranked_RM.shape[-1])
    return ranked_RM.reshape(shape), probs_RM.reshape(shape)


def apply_prediction(engine: Engine, predictor: RoutePredictor) -> PredictorHooks:
    """Prefetch with `predictor`: its ranked experts and their probabilities go to the engine's prefetcher
    (policy 'predictive')."""
    prefetcher = engine.prefetcher
    if prefetcher is None:
        raise MoeflowError("prediction feeds the predictive prefetcher; load the engine with policy='predictive'")
    layers = engine.checkpoint.moe_layers

    def offer(_: RoutePredictor, targets: Sequence[int], s_XTE: np.ndarray) -> None:
        # One pass over every target layer of the answer: one ranking, one list conversion, one offer.
        ranked_XTM, probs_XTM = ranked_probabilities(predictor, s_XTE, prefetcher.width, engine.top_k)
        prefetcher.offer_layers([layers[t] for t in targets], ranked_XTM.tolist(), probs_XTM.tolist())

    if predictor.whole_step:  # its offers come before the forward: they may be read further ahead
        prefetcher.read_ahead = engine.config.read_ahead
    predictor.prepare()
    hooks = PredictorHooks(engine, [predictor], offer, active=lambda: prefetcher.predicting)
    engine.on_close(hooks.close)
    return hooks
