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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import model_file

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
    # Whether one answer before the forward covers every MoE layer. Such a predictor computes it in one fused pass,
    # `step_scores` (float32 [T, L, E]), which the engine ranks and offers in one call (profiling replay does the
    # same); its `on_step` is that answer as per-layer tensors.
    whole_step: ClassVar[bool] = False

    def __init__(self, shape: RoutingShape, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        self.shape = shape
        self.lookahead = lookahead

    @property
    def num_layers(self) -> int:
        return len(self.shape.layers)

    def on_step(self, histories: Sequence[Sequence[int]], n_new: int) -> Scores:
        if self.whole_step:
            return dict(enumerate(torch.from_numpy(self.step_scores(histories, n_new)).unbind(1)))
        return {}

    def step_scores(self, histories: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        """A whole-step predictor's answer for every MoE layer at once: float32 scores [T, L, E]."""
        raise NotImplementedError(f"{self.name} does not answer every layer before the forward")

    def prepare(self) -> None:  # noqa: B027 - optional: most predictors have nothing to build
        """Build now what the first call would build (`moeflow.predictor.apply_prediction` calls it as an engine
        loads), so that a live engine's first request does not pay for it."""

    def on_residual(self, pos: int, residual_TD: torch.Tensor) -> Scores:
        return {}

    def on_routing(self, pos: int, topk_TK: torch.Tensor) -> Scores:
        return {}

    # ---- persistence (trainable predictors) -------------------------------------------------------

    def state(self) -> dict:
        """Everything `restore` needs: tensors by name, or dicts of tensors by name (a module's state_dict)."""
        raise NotImplementedError(f"{self.name} is not trainable")

    def restore(self, state: dict) -> None:
        raise NotImplementedError(f"{self.name} is not trainable")


def predictor_dir(model_dir: str | Path) -> Path:
    """Trained predictors live next to the model they predict: ``<model>/predictors/<name>.safetensors``."""
    return Path(model_dir) / "predictors"


# A saved predictor is two files: its tensors in `<name>.safetensors` (parsed by the safetensors library: no
# pickle, nothing in the file can run code) and what else it is in `<name>.json`: its name, this format tag, the
# model shape it predicts for, its lookahead, and how it was trained. A state's nested dicts (a state_dict) are
# stored flat as "<key>/<name>".
FORMAT = "moeflow-predictor-1"
_NEST = "/"


def saved_files(name: str, folder: str | Path) -> tuple[Path, Path]:
    """The two files a trained predictor `name` occupies in `folder`: its tensors (.safetensors) and its record
    (.json)."""
    return Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"


def save_predictor(
    predictor: RoutePredictor, model_dir: str | Path, meta: dict | None = None, *, folder: str | Path | None = None
) -> Path:
    """Save `predictor` (and `meta`, how it was trained) into `folder` (default: next to the model,
    `predictor_dir(model_dir)`). Returns the tensors' file."""
    out = Path(folder) if folder is not None else predictor_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors_path, record_path = saved_files(predictor.name, out)
    save_file(_flat(predictor.state()), tensors_path)
    record = {"name": predictor.name, "format": FORMAT, "shape": predictor.shape.to_dict(),
              "lookahead": predictor.lookahead, "training": meta or {}}
    record_path.write_text(json.dumps(record, indent=1))
    return tensors_path


def _flat(state: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in state.items():
        for name, tensor in (value.items() if isinstance(value, dict) else [("", value)]):
            assert isinstance(tensor, torch.Tensor) and not tensor.is_sparse, f"{key}{_NEST}{name}: not dense"
            flat[f"{key}{_NEST}{name}" if name else key] = tensor.detach().cpu().contiguous()
    return flat


def _nested(flat: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for name, tensor in flat.items():
        key, nest, sub = name.partition(_NEST)
        if nest:
            state.setdefault(key, {})[sub] = tensor
        else:
            state[key] = tensor
    return state


def load_saved(
    cls: type[RoutePredictor], model_dir: str | Path, shape: RoutingShape, *, folder: str | Path | None = None
) -> RoutePredictor:
    """The trained predictor `cls` from `folder` (default: next to the model, `predictor_dir(model_dir)`).

    Reads only `<name>.json` (JSON) and `<name>.safetensors` (the safetensors library): never a pickle. Anything
    else, or files that do not hold what `cls` saves, is refused with what to do.
    """
    folder = Path(folder) if folder is not None else predictor_dir(model_dir)
    tensors_path, record_path = saved_files(cls.name, folder)
    retrain = f"run `moeflow predictor train --model {model_dir} --out {folder}`"
    tensors_file = model_file(folder, tensors_path.name, named_by=f"the predictor folder {str(folder)!r}")
    record_file = model_file(folder, record_path.name, named_by=f"the predictor folder {str(folder)!r}")
    if tensors_file is None or record_file is None:
        old = folder / f"{cls.name}.pt"
        if old.exists():
            raise MoeflowError(
                f"{old} is a predictor saved by an older moeflow as a torch pickle, which moeflow no longer loads "
                f"(a pickle can run code); {retrain} to save it as {tensors_path.name} + {record_path.name}"
            )
        raise MoeflowError(
            f"predictor {cls.name!r} has not been trained for {model_dir} (no {tensors_path} and {record_path.name}); "
            f"{retrain} first"
        )
    try:
        record = json.loads(record_file.read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("name") != cls.name:
            raise ValueError(f"it is not a {FORMAT} record of predictor {cls.name!r}")
        saved_shape = RoutingShape.from_dict(record["shape"])
        lookahead = record["lookahead"]
        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
            raise ValueError(f"lookahead {lookahead!r} is not a positive integer")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise MoeflowError(f"{record_file} is not a readable predictor record ({e}); {retrain} again") from e
    if saved_shape != shape:
        raise MoeflowError(f"{tensors_path} was trained for another model shape {record['shape']}; {retrain} again")
    try:
        flat = load_file(tensors_file)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type; any unreadable file: same advice
        raise MoeflowError(f"{tensors_file} is not a readable safetensors file ({e}); {retrain} again") from e
    predictor = cls(shape, lookahead=lookahead)
    expected = _flat(predictor.state())
    problem = _state_mismatch(flat, expected)
    if problem is None:
        try:
            predictor.restore(_nested(flat))
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            problem = str(e)
    if problem is not None:
        raise MoeflowError(f"{tensors_file} does not hold a {cls.name} predictor ({problem}); {retrain} again")
    return predictor


def _state_mismatch(saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with `saved` as the state of a predictor whose untrained state is `fresh`, if anything:
    the tensor names, dtypes, and every shape that does not depend on training data."""
    if set(saved) != set(fresh):
        return f"tensors {sorted(saved)}, expected {sorted(fresh)}"
    for name, want in fresh.items():
        got = saved[name]
        if got.dtype != want.dtype or (want.numel() and got.shape != want.shape):
            return f"{name} is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
    return None


def ranked(scores_TE: torch.Tensor, m: int) -> torch.Tensor:
    """The `m` best experts per token, best first (ties to the lower id, deterministically)."""
    return torch.topk(scores_TE.float(), k=min(m, scores_TE.shape[-1]), dim=-1, sorted=True).indices
