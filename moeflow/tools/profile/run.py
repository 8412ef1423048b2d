"""The whole profile: record (or load) a trace, replay every policy and budget, optionally run them
live, describe the trace; write `profile.json` and `profile.png`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from moeflow.build import load
from moeflow.config import DEFAULT_MODEL, ProfileConfig
from moeflow.errors import MoeflowError
from moeflow.model.checkpoint import open_checkpoint
from moeflow.offload.reuse import ReuseModel, reuse_files
from moeflow.predictor.apply import available_predictors, best_predictor
from moeflow.predictor.base import predictor_dir
from moeflow.tools.profile.analysis import analyse
from moeflow.tools.profile.bandwidth import LINKS, MEASURED_DISK, measure_disk_bandwidth
from moeflow.tools.profile.live import live_records
from moeflow.tools.profile.replay import predictions_of, replay
from moeflow.tools.profile.report import ProfileReport
from moeflow.tools.profile.setting import (
    BudgetPoint,
    Geometry,
    parse_budgets,
    parse_policies,
    policy_runs,
    split_names,
)
from moeflow.tools.trace import Trace


def run_profile(
    trace: Trace,
    geometry: Geometry,
    *,
    budgets: Sequence[BudgetPoint],
    policies: Sequence[str],
    predictors: Sequence[str] = (),
    width: int = 0,
    reuse: ReuseModel | None = None,
    links: dict[str, float],
    progress: bool = False,
) -> ProfileReport:
    """Replay every (policy, budget) — predictive once per predictor, evicting by `reuse` if given — and describe
    the trace."""
    runs = policy_runs(policies, predictors)
    results = []
    total = len(runs) * len(budgets) * trace.num_tokens
    with tqdm(total=total, desc="replay", unit="tok", unit_scale=True, disable=not progress) as bar:
        for policy, predictor in runs:
            for budget in budgets:
                bar.set_postfix_str(f"{policy}{'/' + predictor if predictor else ''} @ {budget.spec}")
                r = replay(trace, geometry, policy=policy, budget=budget, predictor=predictor, width=width,
                           reuse=reuse, on_tokens=bar.update)
                results.append(r.record(geometry.expert_bytes, links))
    return ProfileReport(
        model=trace.meta.get("model"),
        files=len(trace.meta.get("files", [])),
        tokens=trace.num_tokens,
        layers=geometry.layers,
        num_experts=geometry.num_experts,
        top_k=geometry.top_k,
        expert_bytes=geometry.expert_bytes,
        links=links,
        results=tuple(results),
        analysis=analyse(trace),
    )


def profile_model(
    model: str | Path | None,
    config: ProfileConfig,
    *,
    data: Sequence[str | Path] | None = None,
    trace_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> ProfileReport:
    """Record (or load) a trace, replay every policy and budget, optionally run them live; write JSON + PNG."""
    policies = parse_policies(config.policies)
    predictors = split_names(config.predictor) if "predictive" in policies else []
    if "predictive" in policies and not predictors:
        raise MoeflowError("policy 'predictive' needs a predictor; pass --predictor NAME (e.g. gate)")
    if trace_dir is not None and data is not None:
        raise MoeflowError("give --data (text to trace) or --trace (a recorded trace to replay), not both")
    trace = Trace.load(trace_dir) if trace_dir is not None else None
    if model is None:
        model = trace.meta["model"] if trace is not None else DEFAULT_MODEL
    if "auto" in predictors:  # the best predictor there is: recorded in the trace, else trained for the model
        have = list(trace.predictions) if trace is not None else available_predictors(model, config.predictor_dir)
        predictors = list(dict.fromkeys(best_predictor(have) if p == "auto" else p for p in predictors))
    checkpoint = open_checkpoint(model)
    geometry = Geometry.of(checkpoint, checkpoint.family.top_k)
    budgets = parse_budgets(config.budgets, geometry)
    if trace is None:
        trace = record_profile_trace(model, config, data, predictors, progress)
        if out is not None:
            trace.save(Path(out) / "trace")
    geometry.check_trace(trace)
    for name in predictors:
        predictions_of(trace, name)
    bandwidth = config.disk_bandwidth * 1e9 or measure_disk_bandwidth(checkpoint)
    links = {**LINKS, MEASURED_DISK: bandwidth}
    reuse = None
    folder = Path(config.predictor_dir) if config.predictor_dir is not None else predictor_dir(model)
    if {"predictive", "auto"} & set(policies) and config.reuse_model and reuse_files(folder)[0].is_file():
        reuse = ReuseModel.load(folder, layers=geometry.layers, num_experts=geometry.num_experts)
    report = run_profile(trace, geometry, budgets=budgets, policies=policies, predictors=predictors,
                         width=config.prefetch_width, reuse=reuse, links=links, progress=progress)
    live = []
    if config.live:
        live = live_records(model, trace, geometry, config, policies=policies, predictors=predictors,
                            budgets=budgets, links=links, progress=progress)
    report = dataclasses.replace(report, results=(*report.results, *live),
                                 data=tuple(trace.meta.get("files", [])[:20]),
                                 reuse_model=None if reuse is None else str(reuse_files(folder)[0]))
    if out is not None:
        from moeflow.tools.profile.plot import plot_report

        report.write(Path(out) / "profile.json")
        plot_report(report, Path(out) / "profile.png")
    return report


def record_profile_trace(
    model: str | Path, config: ProfileConfig, data: Sequence[str | Path] | None, predictors: Sequence[str],
    progress: bool,
) -> Trace:
    """The trace a profile replays: `data` (default: the model's held-out text) with every predictor's predictions."""
    from moeflow.tools.trace import record_trace

    if data is None:
        from moeflow.model.corpus import model_corpus

        data = model_corpus(model, "heldout")
    for f in data:
        if not Path(f).is_file():
            raise MoeflowError(f"data file {str(f)!r} does not exist; pass text files to --data")
    with load(model, expert_budget="all", store="ram", predictor_dir=config.predictor_dir) as engine:
        built = []
        if predictors:
            from moeflow.predictor.apply import build_predictor

            built = [build_predictor(engine, name, lookahead=config.lookahead) for name in predictors]
        return record_trace(engine, data, context=config.context, max_tokens=config.max_tokens, predictors=built,
                            progress=progress)
