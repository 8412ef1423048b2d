"""What `moeflow profile` reports, as typed records, and their JSON (`moeflow-profile/1`).

The records are plain data: this module and `plot` import no torch, so a report can be read,
tabled and drawn where the engine is not installed or not wanted. `to_json()` writes the keys the
format has always had, in the same order; `from_json()` reads them back, refusing a dict that lacks
one or has one it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from moeflow.errors import MoeflowError

FORMAT = "moeflow-profile/1"
MEASURED_DISK = "this machine's disk"  # the link name under which a profile records the disk it measured
Mode = Literal["replay", "live"]


def to_plain(value: Any) -> Any:
    """A record as JSON values: records become dicts (field order), tuples lists; an optional field
    (one whose default is None) is left out while it is None."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = to_plain(v)
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class LayerRecord:
    """One MoE layer's cache counters in one run."""

    layer: int
    hit_rate: float
    hits: int
    misses: int
    prefetch_hits: int
    wasted_prefetches: int
    bytes_read: int

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerRecord:
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One (policy, budget) run over the trace's tokens: replayed, or measured live."""

    policy: str
    predictor: str | None  # predictive only
    mode: Mode
    budget: float  # fraction of all experts' bytes
    budget_spec: str  # as the user wrote it: "25%", "512MiB"
    slots: int
    tokens: int
    hit_rate: float
    hits: int
    misses: int
    prefetch_hits: int
    wasted_prefetches: int
    bytes_per_token: float  # every byte read, demand and prefetch
    demand_bytes_per_token: float  # bytes of demand misses
    stall_s_per_token: dict[str, float]  # link -> demand bytes / bandwidth (prefetch assumed hidden)
    transfer_s_per_token: dict[str, float]  # link -> every byte / bandwidth (nothing hidden)
    per_layer: tuple[LayerRecord, ...]
    prefetch: dict[str, float] | None = None  # the prefetcher's counters (predictive replay)
    measured_stall_s_per_token: float | None = None  # live
    measured_read_gib_s: float | None = None  # live: the store's read rate while a read was in progress
    tokens_per_s: float | None = None  # live
    routing_agreement: float | None = None  # live: share of the trace's routing the engine reproduced

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunRecord:
        return cls(**{**d, "per_layer": tuple(LayerRecord.from_json(x) for x in d["per_layer"])})


@dataclass(frozen=True, kw_only=True)
class ReuseHistogram:
    """Reuse distances of every access but first uses, binned: bin i counts distances in [starts[i], starts[i+1])."""

    bin_starts: tuple[int, ...]
    counts: tuple[int, ...]
    first_uses: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReuseHistogram:
        return cls(bin_starts=tuple(d["bin_starts"]), counts=tuple(d["counts"]), first_uses=d["first_uses"])


@dataclass(frozen=True, kw_only=True)
class LayerPair:
    """Co-activation of two consecutive MoE layers: counts_EE[i][j] tokens routed to i in the first, j in the second."""

    layers: tuple[int, int]
    counts: tuple[tuple[int, ...], ...]  # [E, E]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerPair:
        first, second = d["layers"]
        return cls(layers=(first, second), counts=tuple(tuple(row) for row in d["counts"]))


@dataclass(frozen=True, kw_only=True)
class TraceAnalysis:
    """What the trace itself shows, whatever the cache: hot experts, reuse, routing paths."""

    activation: tuple[tuple[int, ...], ...]  # [L, E]: tokens routed to each expert of each MoE layer
    reuse_distance: ReuseHistogram
    coactivation: tuple[LayerPair, ...]  # a few consecutive layer pairs (all when there are few layers)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceAnalysis:
        return cls(
            activation=tuple(tuple(row) for row in d["activation"]),
            reuse_distance=ReuseHistogram.from_json(d["reuse_distance"]),
            coactivation=tuple(LayerPair.from_json(p) for p in d["coactivation"]),
        )


@dataclass(frozen=True, kw_only=True)
class ProfileReport:
    """A whole profile: the model's geometry, the links, every run, and the trace analysis."""

    model: str | None
    files: int  # text files traced
    tokens: int
    layers: tuple[int, ...]
    num_experts: int  # per MoE layer
    top_k: int
    expert_bytes: int  # one expert on disk
    links: dict[str, float]  # name -> bytes/s
    results: tuple[RunRecord, ...]
    analysis: TraceAnalysis
    data: tuple[str, ...] | None = None  # the first traced files (`profile_model` only)
    reuse_model: str | None = None  # predictive and auto runs evicted by (auto: with) this trained reuse model

    @property
    def replayed(self) -> tuple[RunRecord, ...]:
        return tuple(r for r in self.results if r.mode == "replay")

    def label(self, path: str | Path | None = None) -> str:
        """`model, N tokens (path)`: how a comparison names this report."""
        model = Path(self.model or "model").name
        return f"{model}, {self.tokens:,} tokens" + (f" ({path})" if path is not None else "")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **to_plain(self)}

    def write(self, path: str | Path) -> Path:
        return write_json(self.to_json(), path)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProfileReport:
        d = dict(d)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        return cls(
            **{
                **d,
                "layers": tuple(d["layers"]),
                "results": tuple(RunRecord.from_json(r) for r in d["results"]),
                "analysis": TraceAnalysis.from_json(d["analysis"]),
                "data": tuple(d["data"]) if "data" in d else None,
            }
        )


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """`data` into `path` (folders made), indented as the committed reports are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def read_report(path: str | Path) -> ProfileReport:
    """A `profile.json` written by `moeflow profile --out`; a clear error for anything else."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeflowError(
            f"cannot read profile {path} ({e}); pass the profile.json that `moeflow profile --out` wrote"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MoeflowError(f"{path} is not a moeflow profile ({FORMAT}); pass a profile.json from `moeflow profile`")
    try:
        return ProfileReport.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise MoeflowError(
            f"{path} says {FORMAT} but does not hold one ({type(e).__name__}: {e}); write it again with "
            f"`moeflow profile --out`"
        ) from None
