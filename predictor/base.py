"""The one interface every routing predictor implements, and where predictors are saved.

A predictor sees up to three kinds of evidence during a forward pass and answers with expert
scores for MoE layers that have not run yet (higher = more likely routed):

- ``on_step(histories, n_new)``: before the forward, the token context alone (ExpertFlow-style
  routing-path prediction). ``histories[b]`` is sequence b's tokens so far, the last ``n_new`` of
  which this forward computes; the answer scores those ``T = B * n_new`` tokens.
- ``on_residual(pos, residual_TD)``: the residual stream entering the MoE block at layer position
  ``pos`` (after its attention; ``pos = -1`` is the embedding output), e.g. gate lookahead.
- ``on_routing(pos, topk_TK)``: the real top-k experts of layer position ``pos``.

Answers are ``{target position: scores [T, E]}``, positions indexing the model's MoE layers in
order. A predictor must only answer for targets at least ``lookahead`` positions after the point it
is called at (``on_step`` counts as position -1), so its predictions are usable for prefetch.

Shape legend: T tokens, H hidden, E experts per layer, K top-k, L MoE layers, M ranks kept.
"""

from __future__ import annotations

import json
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError

Scores = dict[int, torch.Tensor]  # target layer position -> scores [T, E]


@dataclass(frozen=True)
class RoutingShape:
    """What a predictor must know about the model it predicts for."""

    layers: tuple[int, ...]  # MoE layer indices in model order
    num_experts: int
    top_k: int
    vocab_size: int

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "num_experts": self.num_experts, "top_k": self.top_k,
                "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> RoutingShape:
        return cls(tuple(d["layers"]), int(d["num_experts"]), int(d["top_k"]), int(d["vocab_size"]))


class RoutePredictor(ABC):
    """Predicts the experts of MoE layers that have not run yet. Subclasses override the hooks they use."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        self.shape = shape
        self.lookahead = lookahead

    @property
    def num_layers(self) -> int:
        return len(self.shape.layers)

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        return {}

    def on_residual(self, pos: int, residual_TD: torch.Tensor) -> Scores:
        return {}

    def on_routing(self, pos: int, topk_TK: torch.Tensor) -> Scores:
        return {}

    # ---- persistence (trainable predictors) -------------------------------------------------------

    def state(self) -> dict:
        """Everything `restore` needs (tensors and JSON-able values)."""
        raise NotImplementedError(f"{self.name} is not trainable")

    def restore(self, state: dict) -> None:
        raise NotImplementedError(f"{self.name} is not trainable")


def predictor_dir(model_dir: str | Path) -> Path:
    """Trained predictors live next to the model they predict: ``<model>/predictors/<name>.pt``."""
    return Path(model_dir) / "predictors"


def save_predictor(
    predictor: RoutePredictor, model_dir: str | Path, meta: dict | None = None, *, folder: str | Path | None = None
) -> Path:
    """Save `predictor` (and `meta` as JSON) into `folder` (default: next to the model, `predictor_dir(model_dir)`)."""
    out = Path(folder) if folder is not None else predictor_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, record = saved_files(predictor.name, out)
    torch.save({"name": predictor.name, "shape": predictor.shape.to_dict(), "lookahead": predictor.lookahead,
                "state": predictor.state()}, path)
    record.write_text(json.dumps({"name": predictor.name, **(meta or {})}, indent=1))
    return path


def saved_files(name: str, folder: str | Path) -> tuple[Path, Path]:
    """The two files a trained predictor `name` occupies in `folder`: its state (.pt) and its record (.json)."""
    return Path(folder) / f"{name}.pt", Path(folder) / f"{name}.json"


def load_saved(
    cls: type[RoutePredictor], model_dir: str | Path, shape: RoutingShape, *, folder: str | Path | None = None
) -> RoutePredictor:
    """The trained predictor `cls` from `folder` (default: next to the model, `predictor_dir(model_dir)`)."""
    folder = Path(folder) if folder is not None else predictor_dir(model_dir)
    path = saved_files(cls.name, folder)[0]
    if not path.is_file():
        raise MoeflowError(
            f"predictor {cls.name!r} has not been trained for {model_dir} (no {path}); "
            f"run `moeflow predictor train --model {model_dir} --out {folder}` first"
        )
    try:
        # weights_only: tensors and plain values only, so a crafted file cannot run code when it is loaded.
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise MoeflowError(
            f"{path} is not a readable predictor (it must hold only tensors and plain values: {e}); train it again"
        ) from e
    if RoutingShape.from_dict(saved["shape"]) != shape:
        raise MoeflowError(f"{path} was trained for another model shape {saved['shape']}; train it again")
    predictor = cls(shape, lookahead=int(saved["lookahead"]))
    predictor.restore(saved["state"])
    return predictor


def ranked(scores_TE: torch.Tensor, m: int) -> torch.Tensor:
    """The `m` best experts per token, best first (ties to the lower id, deterministically)."""
    return torch.topk(scores_TE.float(), k=min(m, scores_TE.shape[-1]), dim=-1, sorted=True).indices
