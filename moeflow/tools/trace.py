"""Routing traces: for every token, its id, position, and every MoE layer's top-k experts.

On disk a trace is a folder of `.npy` arrays plus `meta.json`, memory-mapped on load:

| file | dtype, shape | meaning |
|---|---|---|
| `token_ids.npy` | int32 [N] | token id |
| `positions.npy` | int32 [N] | position within its sequence (0-based) |
| `seq_ids.npy` | int32 [N] | sequence index (a chunk of at most `context` tokens of one document) |
| `doc_ids.npy` | int32 [N] | document index into `meta["files"]` |
| `experts.npy` | int16 [N, L, K] | top-k expert ids of each MoE layer (layer order = `meta["layers"]`) |
| `weights.npy` | float16 [N, L, K] | the router's top-k weights, same order |
| `pred_<name>.npy` | int16 [N, L, M] | optional: predictor `<name>`'s M best experts per layer, best first |
| `prob_<name>.npy` | float32 [N, L, M] | optional: its probability that the token uses each of them |

Predictions (`record_trace(..., predictors=...)`, `moeflow trace --predictors`) are what each
predictor said for token n and layer l at the time it had to say it (`meta["predictions"][name]`
has its `lookahead` and its cost `us_per_token`), so profiling can replay predictive prefetch
without running the model again.

Tokens of one sequence are contiguous and in order, so a trace is also a decode-order access
stream: token n needs experts `experts[n, l]` in layer `layers[l]`. Recorded by teacher forcing
(each chunk is one forward), through the engine with every expert resident.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeflow.engine import Engine
from moeflow.errors import MoeflowError
from moeflow.predictor.apply import PredictorHooks, ranked_probabilities
from moeflow.predictor.base import RoutePredictor

FORMAT = "moeflow-trace/1"
_ARRAYS = ("token_ids", "positions", "seq_ids", "doc_ids", "experts", "weights")


@dataclass(frozen=True, kw_only=True)
class Trace:
    meta: dict
    token_ids: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    doc_ids: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int16 [N, L, M]
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [N, L, M], if recorded

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(out / f"{name}.npy", getattr(self, name))
        for name, pred in self.predictions.items():
            np.save(out / f"pred_{name}.npy", pred)
        for name, prob in self.probabilities.items():
            np.save(out / f"prob_{name}.npy", prob)
        (out / "meta.json").write_text(json.dumps({**self.meta, "num_tokens": self.num_tokens}, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise MoeflowError(f"{path} is not a moeflow trace (no meta.json); record one with `moeflow trace`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise MoeflowError(f"{path}: trace format {meta.get('format')!r} is not {FORMAT!r}; record it again")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        preds = {name: np.load(path / f"pred_{name}.npy", mmap_mode="r") for name in meta.get("predictions", {})}
        probs = {name: np.load(f, mmap_mode="r") for name in preds if (f := path / f"prob_{name}.npy").is_file()}
        return cls(meta=meta, **arrays, predictions=preds, probabilities=probs)

    def select(self, seq_mask: np.ndarray) -> Trace:
        """The sub-trace of the sequences where `seq_mask[seq_id]` is true (e.g. a train/eval split)."""
        keep = np.asarray(seq_mask)[self.seq_ids]
        return Trace(
            meta=self.meta,
            **{name: np.asarray(getattr(self, name))[keep] for name in _ARRAYS},
            predictions={name: np.asarray(p)[keep] for name, p in self.predictions.items()},
            probabilities={name: np.asarray(p)[keep] for name, p in self.probabilities.items()},
        )


def read_documents(files: Iterable[str | Path]) -> list[tuple[str, str]]:
    docs = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise MoeflowError(f"data file {str(path)!r} does not exist; pass text files to --data")
        try:
            docs.append((str(path), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            raise MoeflowError(f"{path} is not UTF-8 text ({e}); pass text files to --data") from e
    if not docs:
        raise MoeflowError("no data files given; pass one or more text files to --data")
    return docs


@torch.inference_mode()
def record_trace(
    engine: Engine,
    files: Iterable[str | Path],
    *,
    context: int = 256,
    max_tokens: int | None = None,
    predictors: Sequence[RoutePredictor] = (),
    ranks: int | None = None,
    progress: bool = True,
) -> Trace:
    """Run every document through `engine` in chunks of `context` tokens and record the routing.

    With `predictors`, also record each one's `ranks` best experts (default 2K) per token and layer,
    as it predicted them during the forward.
    """
    if engine.tokenizer is None:
        raise MoeflowError(f"{engine.checkpoint.path} has no tokenizer; tracing text needs one")
    docs = read_documents(files)
    context = min(context, engine.max_context or context)
    chunks: list[tuple[int, list[int]]] = []
    for d, (_, text) in enumerate(docs):
        # A whole document at once, cut into `context`-token chunks below: its length past the tokenizer's
        # model_max_length is intended, so its "indexing errors" warning would be false (verbose=False).
        ids = engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        chunks.extend((d, ids[i : i + context]) for i in range(0, len(ids), context) if ids[i : i + context])
    return record_token_ids(engine, chunks, context=context, max_tokens=max_tokens, predictors=predictors,
                            ranks=ranks, progress=progress, files=[name for name, _ in docs])


def record_token_ids(
    engine: Engine,
    chunks: Sequence[tuple[int, list[int]]],
    *,
    context: int,
    max_tokens: int | None = None,
    predictors: Sequence[RoutePredictor] = (),
    ranks: int | None = None,
    progress: bool = False,
    files: Sequence[str] = (),
) -> Trace:
    """Record the routing of token sequences given as ids: `chunks` are (document index, ids), each one
    forward (at most `context` ids, as `record_trace` cuts them), in order."""
    layers = engine.checkpoint.moe_layers
    total = sum(len(c) for _, c in chunks)
    if max_tokens is not None:
        total = min(total, max_tokens)
    cols: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    ranks = ranks or 2 * engine.top_k
    pred_cols: dict[str, list[np.ndarray]] = {p.name: [] for p in predictors}
    pred_chunk: dict[str, dict[int, np.ndarray]] = {}
    prob_cols: dict[str, list[np.ndarray]] = {p.name: [] for p in predictors}
    prob_chunk: dict[str, dict[int, np.ndarray]] = {}

    def keep(predictor: RoutePredictor, targets: Sequence[int], scores_XTE: np.ndarray) -> None:
        best_XTM, prob_XTM = ranked_probabilities(predictor, scores_XTE, ranks, engine.top_k)
        for target, best_TM, prob_TM in zip(targets, best_XTM.astype(np.int16), prob_XTM):
            pred_chunk.setdefault(predictor.name, {})[target] = best_TM
            prob_chunk.setdefault(predictor.name, {})[target] = prob_TM

    hooks = PredictorHooks(engine, predictors, keep)
    done = 0
    try:
        with tqdm(total=total, unit="tok", desc="tracing", disable=not progress) as bar:
            for seq, (doc, ids) in enumerate(chunks):
                ids = ids[: total - done]
                if not ids:
                    break
                pred_chunk.clear()
                prob_chunk.clear()
                result = engine.driver.forward(torch.tensor([ids]), histories=[ids], n_new=len(ids))
                routing = {e.plan.layer: e for e in result.routing}
                n = len(ids)
                for p in predictors:
                    got = pred_chunk.get(p.name, {})
                    missing = [pos for pos in range(len(layers)) if pos not in got]
                    if missing:
                        raise MoeflowError(f"predictor {p.name!r} gave no prediction for layer positions {missing}")
                    pred_cols[p.name].append(np.stack([got[pos] for pos in range(len(layers))], axis=1))
                    prob_cols[p.name].append(np.stack([prob_chunk[p.name][pos] for pos in range(len(layers))], axis=1))
                cols["token_ids"].append(np.asarray(ids, dtype=np.int32))
                cols["positions"].append(np.arange(n, dtype=np.int32))
                cols["seq_ids"].append(np.full(n, seq, dtype=np.int32))
                cols["doc_ids"].append(np.full(n, doc, dtype=np.int32))
                cols["experts"].append(
                    np.stack([routing[l].top_k_index_TK.to("cpu", torch.int16).numpy() for l in layers], axis=1)
                )
                cols["weights"].append(
                    np.stack([routing[l].top_k_weights_TK.to("cpu", torch.float16).numpy() for l in layers], axis=1)
                )
                done += n
                bar.update(n)
    finally:
        hooks.close()
    meta = {
        "format": FORMAT,
        "model": str(engine.checkpoint.path),
        "layers": layers,
        "num_experts": int(engine.checkpoint.num_experts[layers[0]]),
        "top_k": engine.top_k,
        "context": context,
        "files": list(files),
    }
    if predictors:
        meta["predictions"] = {
            p.name: {"lookahead": p.lookahead, "ranks": ranks, "us_per_token": 1e6 * hooks.seconds[p.name] / done}
            for p in predictors
        }
    return Trace(
        meta=meta,
        **{name: np.concatenate(parts) for name, parts in cols.items()},
        predictions={name: np.concatenate(parts) for name, parts in pred_cols.items()},
        probabilities={name: np.concatenate(parts) for name, parts in prob_cols.items()},
    )
