"""Training predictors on routing traces, and evaluating them on held-out text.

Metrics, per layer and averaged over layers and tokens (K = the model's top-k):
- ``recall_at_k`` / ``recall_at_2k``: the share of a token's true top-k experts among the
  predictor's best K / 2K;
- ``path_accuracy``: the share of tokens whose predicted top-K set equals the true set in every layer;
- ``us_per_token``: the predictor's own time per token, measured inside the teacher-forced forward
  (batched over a chunk, so a lower bound on its cost in a one-token decode step).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.config import DEFAULT_LOOKAHEAD
from moeflow.engine import Engine
from moeflow.errors import MoeflowError
from moeflow.offload.reuse import NAME as REUSE
from moeflow.offload.reuse import ReuseModel, ReuseShape, reuse_files
from moeflow.predictor.apply import build_predictor, engine_predictor_dir, routing_shape
from moeflow.predictor.base import RoutePredictor, save_predictor, saved_files
from moeflow.predictor.predictors import PREDICTORS
from moeflow.tools.profile.plot import save_png
from moeflow.tools.profile.report import to_plain, write_json
from moeflow.tools.trace import Trace, record_trace


@dataclass(frozen=True, kw_only=True)
class TrainRecord:
    """One predictor's training: where it was saved and what it took, or why it was not trained."""

    trained: bool
    why: str | None = None  # not trained
    path: str | None = None  # trained: the saved predictor (.safetensors; its record beside it, .json)
    train_tokens: int | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    losses: tuple[float, ...] | None = None  # mean loss of each epoch
    lookahead: int | None = None
    trace_files: int | None = None

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainRecord:
        return cls(**{**d, "losses": tuple(d["losses"]) if "losses" in d else None})


@dataclass(frozen=True, kw_only=True)
class LayerScore:
    layer: int
    recall_at_k: float
    recall_at_2k: float
    exact: float  # share of tokens whose predicted top-K set is this layer's true set


@dataclass(frozen=True, kw_only=True)
class PredictorScore:
    """How well one predictor's recorded predictions match the true routing."""

    name: str
    recall_at_k: float
    recall_at_2k: float
    path_accuracy: float
    us_per_token: float  # nan where the trace did not time the predictor
    lookahead: int | None  # what the trace recorded it at
    per_layer: tuple[LayerScore, ...]

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PredictorScore:
        return cls(**{**d, "per_layer": tuple(LayerScore(**x) for x in d["per_layer"])})


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """`moeflow predictor eval`: every predictor scored on the same held-out tokens."""

    tokens: int
    top_k: int
    num_experts: int
    predictors: tuple[PredictorScore, ...]

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalReport:
        return cls(**{**d, "predictors": tuple(PredictorScore.from_json(p) for p in d["predictors"])})

    def write(self, path: str | Path) -> Path:
        return write_json(self.to_json(), path)


def train_predictors(engine: Engine, trace: Trace, names: Sequence[str], *, out: str | Path | None = None,
                     overwrite: bool = False, lookahead: int = DEFAULT_LOOKAHEAD, epochs: int = 12,
                     progress: bool = True) -> dict[str, TrainRecord]:
    """Fit every trainable predictor in `names` on `trace` and save it in `out` (default: where `engine` reads
    predictors, `engine_predictor_dir`). Refuses, before training anything, to replace saved predictors there
    unless `overwrite`."""
    shape = routing_shape(engine)
    if list(trace.layers) != list(shape.layers) or trace.num_experts != shape.num_experts:
        raise MoeflowError("the trace was recorded on another model (layers or experts differ); record it again")
    for name in names:
        if name not in PREDICTORS and name != REUSE:
            raise MoeflowError(f"unknown predictor {name!r}; choose from: {', '.join([*PREDICTORS, REUSE])}")
    folder = Path(out) if out is not None else engine_predictor_dir(engine)

    def files(name: str) -> tuple[Path, ...]:
        if name == REUSE:
            return reuse_files(folder)
        return saved_files(name, folder) if PREDICTORS[name].trainable else ()

    taken = [str(f) for n in names for f in files(n) if f.exists()]
    if taken and not overwrite:
        raise MoeflowError(
            f"{folder} already holds trained predictors ({', '.join(taken)}); pass --force to replace them, "
            "or --out DIR to write elsewhere"
        )
    report = {}
    for name in names:
        if not files(name):
            report[name] = TrainRecord(trained=False, why="training-free")
            continue
        t0 = time.perf_counter()
        if name == REUSE:  # not a routing predictor: the eviction policy's reuse model (moeflow.offload.reuse)
            model = ReuseModel(ReuseShape(layers=shape.layers, num_experts=shape.num_experts))
            losses = model.fit(np.asarray(trace.experts), epochs=epochs, progress=progress)
        else:
            predictor = PREDICTORS[name](shape, lookahead=lookahead)
            losses = predictor.fit(np.asarray(trace.token_ids), np.asarray(trace.positions),
                                   np.asarray(trace.experts), epochs=epochs, progress=progress)
        seconds = time.perf_counter() - t0
        meta = {"train_tokens": trace.num_tokens, "train_seconds": seconds, "epochs": epochs, "losses": losses,
                "lookahead": lookahead, "trace_files": len(trace.meta.get("files", []))}
        if name == REUSE:
            path = model.save(folder, meta)
        else:
            path = save_predictor(predictor, engine.checkpoint.path, meta, folder=folder)
        report[name] = TrainRecord(trained=True, path=str(path), **{**meta, "losses": tuple(losses)})
    return report


def score_predictions(trace: Trace, name: str) -> PredictorScore:
    """Recall at K and 2K, exact-path accuracy, per layer and overall, of `trace`'s recorded predictions."""
    if name not in trace.predictions:
        raise MoeflowError(f"the trace has no predictions of {name!r}")
    true_NLK = np.asarray(trace.experts).astype(np.int64)
    pred_NLM = np.asarray(trace.predictions[name]).astype(np.int64)
    K = true_NLK.shape[-1]

    def hits(m: int) -> np.ndarray:  # [N, L]: true experts among the best m
        return (true_NLK[:, :, :, None] == pred_NLM[:, :, None, :m]).any(-1).sum(-1)

    at_k, at_2k = hits(K) / K, hits(min(2 * K, pred_NLM.shape[-1])) / K
    exact_NL = at_k == 1.0
    meta = trace.meta.get("predictions", {}).get(name, {})
    return PredictorScore(
        name=name,
        recall_at_k=float(at_k.mean()),
        recall_at_2k=float(at_2k.mean()),
        path_accuracy=float(exact_NL.all(axis=1).mean()),
        us_per_token=float(meta.get("us_per_token", float("nan"))),
        lookahead=meta.get("lookahead"),
        per_layer=tuple(
            LayerScore(layer=int(layer), recall_at_k=float(at_k[:, i].mean()), recall_at_2k=float(at_2k[:, i].mean()),
                       exact=float(exact_NL[:, i].mean()))
            for i, layer in enumerate(trace.layers)
        ),
    )


def evaluate(engine: Engine, names: Sequence[str], files: Sequence[str | Path], *, lookahead: int = DEFAULT_LOOKAHEAD,
             context: int = 256, max_tokens: int | None = None, progress: bool = True) -> EvalReport:
    """Run `files` through the model with every predictor attached; score what each predicted."""
    predictors: list[RoutePredictor] = [build_predictor(engine, n, lookahead=lookahead) for n in names]
    trace = record_trace(engine, files, context=context, max_tokens=max_tokens, predictors=predictors,
                         progress=progress)
    return EvalReport(tokens=trace.num_tokens, top_k=trace.top_k, num_experts=trace.num_experts,
                      predictors=tuple(score_predictions(trace, n) for n in names))


def plot_eval(report: EvalReport, out_png: str | Path) -> Path:
    """Recall at K and 2K per predictor (bars) and per layer (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = report.predictors
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    best = max(preds, key=lambda p: p.recall_at_k)
    fig.suptitle(f"{best.name} predicts {100 * best.recall_at_k:.0f}% of each token's top-{report.top_k} experts "
                 f"(recall@K), {100 * best.recall_at_2k:.0f}% among its best {2 * report.top_k} (recall@2K), at "
                 f"{best.us_per_token:.1f} µs/token", fontsize=12)
    x = np.arange(len(preds))
    ax1.bar(x - 0.2, [p.recall_at_k for p in preds], 0.4, label="recall@K")
    ax1.bar(x + 0.2, [p.recall_at_2k for p in preds], 0.4, label="recall@2K")
    for i, p in enumerate(preds):
        ax1.text(i, p.recall_at_2k + 0.01, f"{p.us_per_token:.1f} µs/tok", ha="center", fontsize=7)
    ax1.set_xticks(x, [p.name for p in preds])
    ax1.set_ylim(0, 1.18)
    ax1.set_ylabel("share of true top-K experts predicted")
    ax1.set_title(f"routing prediction on held-out text ({report.tokens:,} tokens; label: cost)", fontsize=10)
    ax1.legend(loc="upper right", ncol=2, fontsize=9)
    for p in preds:
        ax2.plot([r.layer for r in p.per_layer], [r.recall_at_k for r in p.per_layer], marker="o", label=p.name)
    layers = sorted({r.layer for p in preds for r in p.per_layer})
    ax2.set_xticks(layers, [str(layer) for layer in layers])
    ax2.set_xlabel("MoE layer")
    ax2.set_ylabel("recall@K")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("recall@K per MoE layer", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out_png, dpi=120)
