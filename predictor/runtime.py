"""Running predictors inside an engine's forward pass, and building them for an engine.

`PredictorHooks` attaches to a loaded `moeflow.Engine`: a forward hook on the token embedding, a
pre-hook on each MoE layer's pre-MoE norm (its input is the residual after attention), and a
routing observer. Each predictor's answers go to a sink as (predictor, target position, scores);
the engine's predictive policy offers them to the prefetcher, trace recording stores them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moeflow.errors import MoeflowError

from .base import RoutePredictor, RoutingShape, Scores, load_saved
from .predictors import PREDICTORS, GateLookahead

Sink = Callable[[RoutePredictor, int, torch.Tensor], None]


def routing_shape(engine: object) -> RoutingShape:
    ckpt = engine.checkpoint
    layers = tuple(ckpt.moe_layers)
    return RoutingShape(layers, int(ckpt.num_experts[layers[0]]), int(engine.top_k),
                        int(engine.model.config.vocab_size))


def build_predictor(engine: object, name: str, *, lookahead: int = 1) -> RoutePredictor:
    """The predictor `name` for `engine`'s model: gate lookahead from its routers, others as trained."""
    if name not in PREDICTORS:
        raise MoeflowError(f"unknown predictor {name!r}; choose one of: {', '.join(PREDICTORS)}")
    shape = routing_shape(engine)
    cls = PREDICTORS[name]
    if issubclass(cls, GateLookahead):
        return cls.from_model(engine.model, shape, lookahead=lookahead)
    predictor = load_saved(cls, engine.checkpoint.path, shape)
    if predictor.lookahead != lookahead and name == "transition":
        raise MoeflowError(
            f"the transition predictor was trained for lookahead {predictor.lookahead}; "
            f"use --lookahead {predictor.lookahead} or train it again with --lookahead {lookahead}"
        )
    predictor.lookahead = lookahead
    return predictor


def available_predictors(model_dir: str | Path) -> list[str]:
    """Predictors usable for the model now: the training-free ones and those trained next to it."""
    folder = Path(model_dir) / "predictors"
    return [n for n, cls in PREDICTORS.items() if not cls.trainable or (folder / f"{n}.pt").is_file()]


class PredictorHooks:
    """Feeds predictors from inside the model's forward; `begin(histories, n_new)` before each forward."""

    def __init__(self, engine: object, predictors: Sequence[RoutePredictor], sink: Sink) -> None:
        self.predictors = list(predictors)
        self.sink = sink
        self.seconds = {p.name: 0.0 for p in self.predictors}
        self._pos_of = {layer: i for i, layer in enumerate(engine.checkpoint.moe_layers)}
        model = engine.model
        self._handles = [model.model.embed_tokens.register_forward_hook(self._on_embedding)]
        if any(type(p).on_residual is not RoutePredictor.on_residual for p in self.predictors):
            for layer, pos in self._pos_of.items():
                norm = model.model.layers[layer].post_attention_layernorm
                self._handles.append(norm.register_forward_pre_hook(self._residual_hook(pos)))
        self._runtime = engine.runtime
        self._runtime.observers.append(self._on_routing)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._on_routing in self._runtime.observers:
            self._runtime.observers.remove(self._on_routing)

    def _emit(self, predictor: RoutePredictor, answer: Callable[[], Scores]) -> None:
        t0 = time.perf_counter()
        scores = answer()
        self.seconds[predictor.name] += time.perf_counter() - t0
        for target, scores_TE in scores.items():
            self.sink(predictor, target, scores_TE)

    def begin(self, histories: Sequence[Sequence[int]], n_new: int) -> None:
        for p in self.predictors:
            self._emit(p, lambda p=p: p.on_step(histories, n_new))

    def _on_embedding(self, module: object, args: object, out: torch.Tensor) -> None:
        self._residual(-1, out)

    def _residual_hook(self, pos: int) -> Callable:
        def hook(module: object, args: tuple) -> None:
            self._residual(pos, args[0])

        return hook

    def _residual(self, pos: int, hidden: torch.Tensor) -> None:
        r_TD = hidden.reshape(-1, hidden.shape[-1])
        for p in self.predictors:
            self._emit(p, lambda p=p: p.on_residual(pos, r_TD))

    def _on_routing(self, plan: object, top_k_index_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        pos = self._pos_of[plan.layer]
        for p in self.predictors:
            self._emit(p, lambda p=p: p.on_routing(pos, top_k_index_TK))
