"""Expert-cache profiling: replay a routing trace through the real cache, per policy and budget.

A trace (`moeflow.tools.trace`) is recorded once; each (policy, budget) is then a replay that drives the
engine's own `ExpertCache` and policy classes, with no model and no weights: the slot pool lives on
the meta device and the backing store copies nothing (`NullStore`). One decode step is one token:
for every MoE layer in order, its top-k experts go through `serve_layer`, the per-layer cache
protocol the live forward runs, so a replay counts the hits and misses a live run
with the same tokens, policy and budget counts (`live_run` measures that run; a test compares).

`predictive` replays the prefetcher (`moeflow.offload.prefetch.PredictivePrefetcher`) with the
predictions recorded in the trace (`pred_<name>.npy`) and a `TransferEngine` without a thread; `belady`
(`moeflow.offload.policy.BeladyPolicy`) is the offline optimum for demand eviction without prefetch.

Legend: N tokens, L MoE layers, K top-k, E experts per layer, M predicted ranks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeflow.build import load
from moeflow.config import ProfileConfig
from moeflow.engine import DEFAULT_MODEL, Engine
from moeflow.errors import BudgetError, MoeflowError
from moeflow.model.checkpoint import Checkpoint, ExpertKey, open_checkpoint
from moeflow.offload.budget import resolve_budget
from moeflow.offload.cache import ExpertCache, SlotPool
from moeflow.offload.layer import serve_layer
from moeflow.offload.plans import RoutingPlan
from moeflow.offload.policy import POLICIES, BeladyPolicy, EvictionPolicy, make_policy
from moeflow.offload.prefetch import PredictivePrefetcher
from moeflow.offload.stats import CacheStats
from moeflow.offload.transfer import TransferEngine
from moeflow.tools.trace import Trace

FORMAT = "moeflow-profile/1"
REPLAY_POLICIES = (*POLICIES, "belady")
# Link bandwidths in bytes/s for the predicted stall time; the measured disk is added at run time.
LINKS: dict[str, float] = {"PCIe 4 x16": 25e9, "NVMe": 3e9}
MEASURED_DISK = "this machine's disk"


# ---- the setting ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """What replay needs to know about the model: its MoE layers and the size of one expert."""

    layers: tuple[int, ...]
    num_experts: int  # per MoE layer
    top_k: int
    inter: int
    hidden: int
    expert_bytes: int  # one expert on disk: what a miss or a prefetch reads

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def slot_bytes(self) -> int:
        """One slot of the CPU engine's pool (float32), so byte budgets mean what `moeflow generate` makes of them."""
        return 3 * self.inter * self.hidden * 4

    @classmethod
    def of(cls, checkpoint: Checkpoint, top_k: int) -> Geometry:
        layers = tuple(checkpoint.moe_layers)
        loc = checkpoint.experts[(layers[0], 0)]
        inter, hidden = loc.gate.shape
        return cls(
            layers=layers,
            num_experts=int(checkpoint.num_experts[layers[0]]),
            top_k=top_k,
            inter=int(inter),
            hidden=int(hidden),
            expert_bytes=sum(s.nbytes for s in loc.spans),
        )

    def check_trace(self, trace: Trace) -> None:
        if tuple(trace.layers) != self.layers or trace.num_experts != self.num_experts or trace.top_k != self.top_k:
            raise MoeflowError(
                f"the trace was recorded on another model (layers {trace.layers}, {trace.num_experts} experts, "
                f"top-{trace.top_k}; the model has layers {list(self.layers)}, {self.num_experts} experts, "
                f"top-{self.top_k}); pass the matching --model or record the trace again"
            )


@dataclass(frozen=True, kw_only=True)
class BudgetPoint:
    spec: str  # as the user wrote it: "25%", "512MiB"
    fraction: float  # of all experts' bytes
    slots: int


def parse_budgets(text: str, geometry: Geometry) -> list[BudgetPoint]:
    """`--budgets 12.5%,25%,50%` into slot counts, refusing any budget the engine would refuse."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise MoeflowError(f"--budgets {text!r} names no budget; write e.g. --budgets 12.5%,25%,50%")
    total = geometry.slot_bytes * geometry.total_experts
    points = []
    for spec in specs:
        try:
            b = resolve_budget(spec, slot_bytes=geometry.slot_bytes, total_experts=geometry.total_experts,
                               top_k=geometry.top_k)
        except BudgetError as e:
            raise MoeflowError(f"--budgets: {str(e).replace('--expert-budget', 'it')}") from None
        points.append(BudgetPoint(spec=spec, fraction=min(b.budget_bytes / total, 1.0), slots=b.slots))
    return points


def parse_policies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise MoeflowError(f"--policies {text!r} names no policy; choose from: {', '.join(REPLAY_POLICIES)}")
    unknown = [n for n in names if n not in REPLAY_POLICIES]
    if unknown:
        raise MoeflowError(
            f"unknown cache policy {unknown[0]!r} in --policies; choose from: {', '.join(REPLAY_POLICIES)}"
        )
    return list(dict.fromkeys(names))


# ---- replay -----------------------------------------------------------------------------------


class NullStore:
    """A backing tier that moves nothing: each read only reports the expert's size on disk."""

    direct_io = False

    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes

    def read_into(self, key: ExpertKey, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor) -> int:
        return self.expert_bytes

    def close(self) -> None:
        pass


def replay_cache(geometry: Geometry, slots: int, policy: EvictionPolicy) -> ExpertCache:
    """The engine's cache over a meta-device pool (no memory) and a `NullStore`."""
    pool = SlotPool(capacity=slots, inter=geometry.inter, hidden=geometry.hidden, dtype=torch.float32,
                    device=torch.device("meta"))
    return ExpertCache(pool=pool, store=NullStore(geometry.expert_bytes), policy=policy, layers=geometry.layers,
                       budget_bytes=slots * geometry.slot_bytes)


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One (policy, budget) run over a trace's tokens: replayed, or measured live."""

    policy: str
    predictor: str | None
    mode: str  # "replay" | "live"
    budget: BudgetPoint
    tokens: int
    stats: CacheStats
    prefetch: dict | None  # the prefetcher's counters (predictive only)
    seconds: float  # wall time of the run

    def to_dict(self, expert_bytes: int, links: dict[str, float]) -> dict:
        s = self.stats
        per_token = max(self.tokens, 1)
        demand_bytes = s.misses * expert_bytes / per_token
        out = {
            "policy": self.policy,
            "predictor": self.predictor,
            "mode": self.mode,
            "budget": self.budget.fraction,
            "budget_spec": self.budget.spec,
            "slots": self.budget.slots,
            "tokens": self.tokens,
            "hit_rate": s.hit_rate,
            "hits": s.hits,
            "misses": s.misses,
            "prefetch_hits": s.prefetch_hits,
            "wasted_prefetches": s.wasted_prefetches,
            "bytes_per_token": s.bytes_read / per_token,
            "demand_bytes_per_token": demand_bytes,
            # Demand misses stall compute; prefetch reads are assumed hidden behind it...
            "stall_s_per_token": {name: demand_bytes / bw for name, bw in links.items()},
            # ...and if nothing overlaps, every byte read stalls (the upper bound).
            "transfer_s_per_token": {name: s.bytes_read / per_token / bw for name, bw in links.items()},
            "per_layer": [
                {
                    "layer": ls.layer,
                    "hit_rate": ls.hits / (ls.hits + ls.misses) if ls.hits + ls.misses else 0.0,
                    "hits": ls.hits,
                    "misses": ls.misses,
                    "prefetch_hits": ls.prefetch_hits,
                    "wasted_prefetches": ls.wasted_prefetches,
                    "bytes_read": ls.bytes_read,
                }
                for ls in s.per_layer
            ],
        }
        if self.prefetch is not None:
            out["prefetch"] = self.prefetch
        if self.mode == "live":
            out["measured_stall_s_per_token"] = s.stall_s / per_token
            out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return out


def replay(
    trace: Trace,
    geometry: Geometry,
    *,
    policy: str,
    budget: BudgetPoint,
    predictor: str | None = None,
    width: int = 0,
    on_tokens: Callable[[int], None] | None = None,
) -> RunResult:
    """Drive the real cache and `policy` with `trace`'s routing, one token per decode step."""
    geometry.check_trace(trace)
    experts_NLK = np.asarray(trace.experts)
    layers = list(geometry.layers)
    if policy == "belady":
        eviction: EvictionPolicy = BeladyPolicy(experts_NLK, layers)
    else:
        eviction = make_policy(policy)
    cache = replay_cache(geometry, budget.slots, eviction)
    prefetcher, pred_NLM = None, None
    if policy == "predictive":
        pred_NLM, lookahead = predictions_of(trace, predictor)
        width = width or geometry.top_k
        if width > pred_NLM.shape[-1]:
            raise MoeflowError(
                f"--prefetch-width {width} is more than the {pred_NLM.shape[-1]} ranks the trace recorded for "
                f"{predictor!r}; lower it or record the trace again"
            )
        transfer = TransferEngine(cache, background=False)
        prefetcher = PredictivePrefetcher(cache, transfer.prefetch, layers=layers, lookahead=lookahead, width=width)
    t0 = time.perf_counter()
    for n in range(trace.num_tokens):
        if on_tokens is not None and n % 1024 == 1023:
            on_tokens(1024)
        if prefetcher is not None:
            # Every prediction in the trace was made before its layer's lookahead window opened, so
            # offering them all when the step begins issues each at the time the engine issues it.
            prefetcher.begin_step()
            for pos, layer in enumerate(layers):
                prefetcher.offer(layer, [pred_NLM[n, pos, :width].tolist()])
        for pos, layer in enumerate(layers):
            expert_ids = tuple(sorted(set(experts_NLK[n, pos].tolist())))  # the engine's torch.unique
            if prefetcher is not None:
                prefetcher.on_routing(layer, expert_ids)
            serve_layer(cache, RoutingPlan(layer=layer, expert_ids=expert_ids, num_tokens=1))
    if prefetcher is not None:
        prefetcher.end_step()
    if on_tokens is not None:
        on_tokens(trace.num_tokens % 1024)
    return RunResult(
        policy=policy,
        predictor=predictor if policy == "predictive" else None,
        mode="replay",
        budget=budget,
        tokens=trace.num_tokens,
        stats=cache.stats(),
        prefetch=prefetcher.counters.to_dict() if prefetcher is not None else None,
        seconds=time.perf_counter() - t0,
    )


def predictions_of(trace: Trace, predictor: str | None) -> tuple[np.ndarray, int]:
    """The recorded predictions [N, L, M] of `predictor` and the lookahead they were made at."""
    recorded = trace.meta.get("predictions", {})
    if predictor is None or predictor not in trace.predictions:
        have = ", ".join(recorded) or "none"
        raise MoeflowError(
            f"policy 'predictive' replays recorded predictions, but the trace has none of predictor {predictor!r} "
            f"(it has: {have}); record the trace with `moeflow trace --predictors {predictor or 'gate'}` "
            f"or let `moeflow profile` record it (omit --trace)"
        )
    return np.asarray(trace.predictions[predictor]), int(recorded[predictor]["lookahead"])


# ---- live -------------------------------------------------------------------------------------


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


# ---- what the trace itself shows ----------------------------------------------------------------


def activation_counts(trace: Trace) -> np.ndarray:
    """[L, E]: how often each expert of each MoE layer was routed to."""
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    counts_LE = np.zeros((L, trace.num_experts), dtype=np.int64)
    for pos in range(L):
        counts_LE[pos] = np.bincount(experts_NLK[:, pos].reshape(-1), minlength=trace.num_experts)
    return counts_LE


def reuse_distances(trace: Trace) -> np.ndarray:
    """Stack distance of every access: distinct other experts (any layer) used since this expert's last use.

    -1 for a first use. With capacity C, an LRU cache without prefetch hits exactly the accesses
    whose distance is below C (up to the experts of one step, which are pinned together).
    """
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    keys = (np.arange(L)[None, :, None] * trace.num_experts + experts_NLK).reshape(-1).tolist()
    stack: list[int] = []  # most recent first
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        try:
            d = stack.index(key)
            del stack[d]
        except ValueError:
            d = -1
        out[i] = d
        stack.insert(0, key)
    return out


def coactivation(trace: Trace) -> np.ndarray:
    """[L-1, E, E]: tokens routed to expert i in MoE layer l and to expert j in layer l+1."""
    experts_NLK = np.asarray(trace.experts).astype(np.int64)
    N, L, K = experts_NLK.shape
    E = trace.num_experts
    out = np.zeros((max(L - 1, 0), E, E), dtype=np.int64)
    for pos in range(L - 1):
        a = np.repeat(experts_NLK[:, pos], K, axis=1).reshape(-1)
        b = np.tile(experts_NLK[:, pos + 1], (1, K)).reshape(-1)
        np.add.at(out[pos], (a, b), 1)
    return out


def analyse(trace: Trace) -> dict:
    dist = reuse_distances(trace)
    warm = dist[dist >= 0]
    longest = int(warm.max(initial=0))
    # One bin per distance while that stays readable, else logarithmic bins.
    if longest < 160:
        edges = np.arange(longest + 1)
    else:
        edges = np.unique(np.r_[0, np.geomspace(1, longest + 1, 40).astype(np.int64)])
    counts, _ = np.histogram(warm, bins=np.r_[edges, edges[-1] + 1])
    pairs = coactivation(trace)
    shown = sorted({0, len(pairs) // 2, len(pairs) - 1}) if len(pairs) > 4 else list(range(len(pairs)))
    return {
        "activation": activation_counts(trace).tolist(),
        "reuse_distance": {
            "bin_starts": edges.tolist(),
            "counts": counts.tolist(),
            "first_uses": int((dist < 0).sum()),
        },
        # Layer l -> l+1 for a few l (all when there are few layers): counts [E, E], rows layer l's expert.
        "coactivation": [
            {"layers": [trace.layers[p], trace.layers[p + 1]], "counts": pairs[p].tolist()} for p in shown
        ],
    }


# ---- bandwidth --------------------------------------------------------------------------------


def measure_disk_bandwidth(checkpoint: Checkpoint, *, max_reads: int = 256, max_s: float = 2.0) -> float:
    """Bytes/s of the engine's own expert reads (`DiskStore`, O_DIRECT where allowed), one expert at a time.

    The median over up to `max_reads` reads: on a shared machine a few reads wait behind other
    processes' I/O, and the median is the steady rate a miss sees (on this project's 2-core machine,
    0.42 MiB experts: median 1.0-1.3 GB/s in three runs, while the mean ranged 0.02-0.4 GB/s).
    """
    from moeflow.offload.store import DiskStore

    store = DiskStore(checkpoint, direct_io=True)
    try:
        keys = sorted(checkpoint.experts)
        loc = checkpoint.experts[keys[0]]
        inter, hidden = loc.gate.shape
        gate_up = torch.empty(2 * inter, hidden, dtype=loc.gate.dtype)
        down = torch.empty(hidden, inter, dtype=loc.down.dtype)
        rates = []
        t_end = time.perf_counter() + max_s
        while len(rates) < max_reads and time.perf_counter() < t_end:
            key = keys[len(rates) % len(keys)]
            t0 = time.perf_counter()
            nbytes = store.read_into(key, gate_up, down)
            rates.append(nbytes / max(time.perf_counter() - t0, 1e-9))
        return float(np.median(rates))
    finally:
        store.close()


# ---- the whole profile ----------------------------------------------------------------------------


def run_profile(
    trace: Trace,
    geometry: Geometry,
    *,
    budgets: Sequence[BudgetPoint],
    policies: Sequence[str],
    predictors: Sequence[str] = (),
    width: int = 0,
    links: dict[str, float],
    progress: bool = False,
) -> dict:
    """Replay every (policy, budget) — predictive once per predictor — and describe the trace."""
    runs: list[tuple[str, str | None]] = []
    for policy in policies:
        if policy == "predictive":
            if not predictors:
                raise MoeflowError("policy 'predictive' needs a predictor; pass --predictor NAME (e.g. gate)")
            runs.extend((policy, p) for p in predictors)
        else:
            runs.append((policy, None))
    results = []
    total = len(runs) * len(budgets) * trace.num_tokens
    with tqdm(total=total, desc="replay", unit="tok", unit_scale=True, disable=not progress) as bar:
        for policy, predictor in runs:
            for budget in budgets:
                bar.set_postfix_str(f"{policy}{'/' + predictor if predictor else ''} @ {budget.spec}")
                r = replay(trace, geometry, policy=policy, budget=budget, predictor=predictor, width=width,
                           on_tokens=bar.update)
                results.append(r.to_dict(geometry.expert_bytes, links))
    return {
        "format": FORMAT,
        "model": trace.meta.get("model"),
        "files": len(trace.meta.get("files", [])),
        "tokens": trace.num_tokens,
        "layers": list(geometry.layers),
        "num_experts": geometry.num_experts,
        "top_k": geometry.top_k,
        "expert_bytes": geometry.expert_bytes,
        "links": links,
        "results": results,
        "analysis": analyse(trace),
    }


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def profile_model(
    model: str | Path | None,
    config: ProfileConfig,
    *,
    data: Sequence[str | Path] | None = None,
    trace_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Record (or load) a trace, replay every policy and budget, optionally run them live; write JSON + PNG."""
    policies = parse_policies(config.policies)
    predictors = _names(config.predictor) if "predictive" in policies else []
    if "predictive" in policies and not predictors:
        raise MoeflowError("policy 'predictive' needs a predictor; pass --predictor NAME (e.g. gate)")
    if trace_dir is not None and data is not None:
        raise MoeflowError("give --data (text to trace) or --trace (a recorded trace to replay), not both")
    trace = Trace.load(trace_dir) if trace_dir is not None else None
    if model is None:
        model = trace.meta["model"] if trace is not None else DEFAULT_MODEL
    checkpoint = open_checkpoint(model)
    geometry = Geometry.of(checkpoint, int(checkpoint.config["num_experts_per_tok"]))
    budgets = parse_budgets(config.budgets, geometry)
    if trace is None:
        trace = _record(model, config, data, predictors, progress)
        if out is not None:
            trace.save(Path(out) / "trace")
    geometry.check_trace(trace)
    for name in predictors:
        predictions_of(trace, name)
    bandwidth = config.disk_bandwidth * 1e9 or measure_disk_bandwidth(checkpoint)
    links = {**LINKS, MEASURED_DISK: bandwidth}
    report = run_profile(trace, geometry, budgets=budgets, policies=policies, predictors=predictors,
                         width=config.prefetch_width, links=links, progress=progress)
    report["data"] = trace.meta.get("files", [])[:20]
    if config.live:
        for policy in (p for p in policies if p != "belady"):
            for predictor in predictors if policy == "predictive" else [None]:
                for budget in budgets:
                    options = dict(expert_budget=budget.spec, policy=policy, store=config.live_store,
                                   lookahead=config.lookahead, prefetch_width=config.prefetch_width)
                    if predictor is not None:
                        options["predictor"] = predictor
                    with load(model, **options) as engine:
                        stats, seen_NLK, seconds = live_run(engine, trace, progress=progress)
                    r = RunResult(policy=policy, predictor=predictor, mode="live", budget=budget,
                                  tokens=trace.num_tokens, stats=stats, prefetch=None, seconds=seconds)
                    d = r.to_dict(geometry.expert_bytes, links)
                    d["routing_agreement"] = float((seen_NLK == np.asarray(trace.experts)).mean())
                    report["results"].append(d)
    if out is not None:
        from moeflow.tools.profile.plot import plot_report

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(report, indent=1))
        plot_report(report, out / "profile.png")
    return report


def _record(
    model: str | Path, config: ProfileConfig, data: Sequence[str | Path] | None, predictors: Sequence[str],
    progress: bool,
) -> Trace:
    from moeflow.tools.trace import record_trace

    if data is None:
        from moeflow.model.corpus import model_corpus

        data = model_corpus(model, "heldout")
    for f in data:
        if not Path(f).is_file():
            raise MoeflowError(f"data file {str(f)!r} does not exist; pass text files to --data")
    with load(model, expert_budget="all", store="ram") as engine:
        built = []
        if predictors:
            from moeflow.predictor.apply import build_predictor

            built = [build_predictor(engine, name, lookahead=config.lookahead) for name in predictors]
        return record_trace(engine, data, context=config.context, max_tokens=config.max_tokens, predictors=built,
                            progress=progress)


def read_report(path: str | Path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeflowError(
            f"cannot read profile {path} ({e}); pass the profile.json that `moeflow profile --out` wrote"
        ) from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise MoeflowError(f"{path} is not a moeflow profile ({FORMAT}); pass a profile.json from `moeflow profile`")
    return report


def default_label(report: dict, path: str | Path | None = None) -> str:
    model = Path(str(report.get("model") or "model")).name
    return f"{model}, {report['tokens']:,} tokens" + (f" ({path})" if path is not None else "")
