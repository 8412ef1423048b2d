"""Pictures and tables of a `moeflow profile` report (`moeflow.tools.profile.report.ProfileReport`).

One PNG answers "how big must my expert cache be, and what will a miss cost": hit rate per policy
against the budget with Belady's optimum as the reference, predicted stall time per token on
common links, a per-layer table, and what the routing itself looks like (which experts are hot,
how soon an expert is reused, which experts follow which across layers).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.tools.profile.report import MEASURED_DISK, ProfileReport, RunRecord

BELADY_LABEL = "belady (offline optimum, no prefetch)"
TEXT_WIDTH = 100  # columns the text tables are kept within


def run_label(run: RunRecord) -> str:
    if run.policy == "predictive" and run.predictor:
        return f"predictive ({run.predictor})"
    return BELADY_LABEL if run.policy == "belady" else run.policy


def _hit_rate(run: RunRecord) -> float:
    return run.hit_rate


def _curves(
    report: ProfileReport, value: Callable[[RunRecord], float] = _hit_rate
) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (budgets, values) over the replayed results, budgets ascending."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in report.replayed:
        out.setdefault(run_label(r), []).append((r.budget, value(r)))
    return {label: tuple(map(list, zip(*sorted(points)))) for label, points in out.items()}


def _colors(labels: Sequence[str]) -> dict[str, object]:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = [lb for lb in labels if lb != BELADY_LABEL]
    colors: dict[str, object] = {lb: cycle[i % len(cycle)] for i, lb in enumerate(others)}
    colors[BELADY_LABEL] = "black"
    return colors


def _plot_hit_rates(ax, report: ProfileReport, colors: dict, *, linestyle: str = "-", suffix: str = "") -> None:
    for label, (budgets, rates) in _curves(report).items():
        is_belady = label == BELADY_LABEL
        ax.plot(
            [100 * b for b in budgets],
            [100 * r for r in rates],
            linestyle="--" if is_belady and linestyle == "-" else linestyle,
            marker="o",
            color=colors[label],
            linewidth=2.2 if is_belady else 1.8,
            label=label + suffix,
        )


def _short(label: str) -> str:
    return label.replace(" (offline optimum, no prefetch)", "")


def _name(r: RunRecord) -> str:
    return _short(run_label(r)) + (" (live)" if r.mode == "live" else "")


def _hit_table(report: ProfileReport) -> tuple[list[str], list[list[str]]]:
    """Hit rate per run, overall and per MoE layer (the layer columns only while there are at most 8)."""
    per_layer = len(report.layers) <= 8
    header = ["policy", "budget", "slots", "hit rate"] + ([f"L{layer}" for layer in report.layers] if per_layer else [])
    rows = []
    for r in report.results:
        row = [_name(r), f"{100 * r.budget:g}%", str(r.slots), f"{100 * r.hit_rate:.1f}%"]
        rows.append(row + ([f"{100 * pl.hit_rate:.0f}%" for pl in r.per_layer] if per_layer else []))
    return header, rows


def _link_name(link: str) -> str:
    return "this disk" if link == MEASURED_DISK else link


def _cost_table(report: ProfileReport) -> tuple[list[str], list[list[str]]]:
    """Bytes read per token (all, and demand misses alone) and the predicted stall per link (demand / bandwidth)."""
    header = ["policy", "budget", "MiB/tok\nread", "MiB/tok\ndemand"]
    header += [f"stall ms/tok\n{_link_name(link)}" for link in report.links]
    rows = []
    for r in report.results:
        row = [_name(r), f"{100 * r.budget:g}%", f"{r.bytes_per_token / 2**20:.2f}",
               f"{r.demand_bytes_per_token / 2**20:.2f}"]
        rows.append(row + [f"{1e3 * r.stall_s_per_token[link]:.3g}" for link in report.links])
    return header, rows


def _live_table(report: ProfileReport) -> tuple[list[str], list[list[str]]]:
    """The live runs as the engine measured them: tokens/s, stall and bytes per token, the store's read rate while
    it read, and the share of the trace's routing the engine reproduced."""
    header = ["policy", "budget", "tok/s", "stall ms/tok\nmeasured", "MiB/tok\nread", "GiB/s while\nreading",
              "routing\nagreed"]
    rows = []
    for r in report.results:
        if r.mode != "live":
            continue
        rows.append([_name(r), f"{100 * r.budget:g}%", f"{r.tokens_per_s:.1f}",
                     f"{1e3 * r.measured_stall_s_per_token:.3g}", f"{r.bytes_per_token / 2**20:.2f}",
                     _maybe(r.measured_read_gib_s, "{:.2f}"), _maybe(r.routing_agreement, "{:.1%}")])
    return header, rows


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _stall_link(report: ProfileReport) -> str:
    """The link the picture's stall panel shows: this machine's disk when measured, else the slowest."""
    return MEASURED_DISK if MEASURED_DISK in report.links else min(report.links, key=report.links.__getitem__)


def takeaway(report: ProfileReport) -> str:
    """One line: the best live-able policy at the middle budget against LRU and Belady, hit rate and bytes."""
    budgets = sorted({r.budget for r in report.replayed})
    if not budgets:
        return ""
    mid = min(budgets, key=lambda b: abs(b - 0.25)) if len(budgets) < 3 else budgets[len(budgets) // 2]
    at = {run_label(r): r for r in report.replayed if r.budget == mid}
    live_able = [r for label, r in at.items() if label != BELADY_LABEL]
    if not live_able:
        return ""
    best = max(live_able, key=lambda r: r.hit_rate)
    text = f"at {100 * mid:g}% of experts resident, {run_label(best)} hits {100 * best.hit_rate:.1f}%"
    others = [f"{name} {100 * at[label].hit_rate:.1f}%" for label, name in (("lru", "LRU"), (BELADY_LABEL, "Belady"))
              if label in at and at[label] is not best]
    if others:
        text += f" ({', '.join(others)})"
    text += f", reading {best.bytes_per_token / 2**20:.2f} MiB/token"
    if "lru" in at and at["lru"] is not best:
        text += f" (LRU {at['lru'].bytes_per_token / 2**20:.2f})"
    return text


def plot_report(report: ProfileReport, out_png: str | Path, *, title: str | None = None) -> Path:
    """The one-page picture of a profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(report)
    colors = _colors(list(curves))
    n_rows_table = len(report.results)
    fig = plt.figure(figsize=(18, 19 + 0.22 * n_rows_table))
    grid = fig.add_gridspec(4, 1, height_ratios=[1.0, 0.3 + 0.05 * n_rows_table, 1.0, 0.8], hspace=0.55, top=0.93)
    setup = (f"{Path(report.model or 'model').name}, {report.tokens:,} tokens replayed, {len(report.layers)} MoE "
             f"layers x {report.num_experts} experts, top-{report.top_k}, "
             f"{report.expert_bytes / 2**20:.2f} MiB per expert")
    line = takeaway(report)
    fig.suptitle(title or (f"moeflow profile: {line}\n{setup}" if line else f"moeflow profile: {setup}"), fontsize=14,
                 y=0.975)
    top = grid[0].subgridspec(1, 3, wspace=0.28)
    xticks = sorted({100 * r.budget for r in report.results})

    def budget_axis(ax: Any, ylabel: str, panel_title: str) -> None:
        ax.set_xlabel("expert budget (% of all experts resident)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xticks, [f"{x:g}" for x in xticks])
        ax.grid(alpha=0.3, which="both")
        ax.set_title(panel_title, fontsize=11)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)

    ax = fig.add_subplot(top[0, 0])
    _plot_hit_rates(ax, report, colors)
    ax.set_ylim(0, 100)
    budget_axis(ax, "hit rate (%)", "cache hit rate (one decode step per token)")

    ax = fig.add_subplot(top[0, 1])
    for label, (budgets, values) in _curves(report, lambda r: r.bytes_per_token).items():
        ax.plot([100 * b for b in budgets], [v / 2**20 for v in values], marker="o", color=colors[label],
                linestyle="--" if label == BELADY_LABEL else "-", label=_short(label))
    ax.set_ylim(bottom=0)
    budget_axis(ax, "MiB read per token", "bytes read per token: demand misses + prefetches")

    link = _stall_link(report)
    bandwidth = report.links[link]
    ax = fig.add_subplot(top[0, 2])
    for label, (budgets, demand) in _curves(report, lambda r: r.demand_bytes_per_token).items():
        ax.plot([100 * b for b in budgets], [1e3 * d / bandwidth for d in demand], marker="o", color=colors[label],
                linestyle="--" if label == BELADY_LABEL else "-", label=_short(label))
    labelled = set()
    for r in report.results:  # what the live engine measured, beside what replay predicts
        if r.mode == "live":
            label = run_label(r)
            ax.scatter([100 * r.budget], [1e3 * r.measured_stall_s_per_token], marker="x", s=80,
                       color=colors.get(label, "black"),
                       label=None if label in labelled else f"{_short(label)}: measured live")
            labelled.add(label)
    ax.set_ylim(bottom=0)
    budget_axis(ax, f"ms per token on {link} ({bandwidth / 1e9:.3g} GB/s)",
                "predicted stall per token: demand misses only\n(prefetches counted left, assumed hidden by compute;"
                " x: measured live)")

    ax = fig.add_subplot(grid[1])
    ax.axis("off")
    header, rows = _hit_table(report)
    cost_header, cost_rows = _cost_table(report)
    header += cost_header[2:]
    rows = [row + cost[2:] for row, cost in zip(rows, cost_rows)]
    widths = [3.0 if i == 0 else 1.0 for i in range(len(header))]
    table = ax.table(cellText=rows, colLabels=header, cellLoc="center", bbox=[0, 0, 1, 1],
                     colWidths=[w / sum(widths) for w in widths])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        if row == 0:  # two-line names: twice a row's height (the bbox scales every row to fit)
            cell.set_height(2 * cell.get_height())
            cell.set_facecolor("#e8e8e8")
    ax.set_title("per policy and budget: hit rate (overall and per MoE layer), MiB read per token (all / demand "
                 "misses), predicted stall per token on each link (demand misses / bandwidth)", pad=10)

    act = np.asarray(report.analysis.activation, dtype=float)
    share = act / np.maximum(act.sum(axis=1, keepdims=True), 1)
    middle = grid[2].subgridspec(1, 2, wspace=0.22)
    ax = fig.add_subplot(middle[0, 0])
    im = ax.imshow(100 * share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(report.layers)), [str(layer) for layer in report.layers])
    ax.set_title(f"expert activation (% of the layer's routed tokens; uniform = {100 / report.num_experts:.1f}%)")
    fig.colorbar(im, ax=ax, fraction=0.04, label="% of the layer's routed tokens")

    ax = fig.add_subplot(middle[0, 1])
    reuse = report.analysis.reuse_distance
    starts, counts = np.asarray(reuse.bin_starts), np.asarray(reuse.counts, dtype=float)
    total = counts.sum() + reuse.first_uses
    widths = np.diff(np.r_[starts, starts[-1] + max(1, starts[-1] - starts[-2] if len(starts) > 1 else 1)])
    ax.bar(starts + 1, 100 * counts / max(total, 1), width=widths, align="edge", color="#4c72b0", edgecolor="white")
    if starts[-1] >= 160:
        ax.set_xscale("log")
    seen = set()
    for r in report.results:
        if r.slots not in seen:
            seen.add(r.slots)
            ax.axvline(r.slots + 1, color="gray", linestyle=":")
            ax.text(r.slots + 1, ax.get_ylim()[1] * 0.95, f" {r.slots} slots", fontsize=8, color="gray", va="top")
    share_below = 100 * np.cumsum(counts) / max(total, 1)  # distance < next bin start
    twin = ax.twinx()
    twin.step(np.r_[starts[1:], starts[-1] + widths[-1]] + 1, share_below, where="pre", color="#dd8452")
    twin.set_ylim(0, 100)
    twin.set_ylabel("cumulative % (= LRU hit rate with that many slots)", color="#dd8452")
    ax.set_xlabel("reuse distance + 1 (distinct experts used in between)")
    ax.set_ylabel("% of accesses")
    first = 100 * reuse.first_uses / max(total, 1)
    ax.set_title(f"reuse distance: LRU with C slots hits those left of C ({first:.2f}% first uses)")

    coact = report.analysis.coactivation
    if coact:
        sub = grid[3].subgridspec(1, len(coact), wspace=0.3)
        for i, pair in enumerate(coact):
            ax = fig.add_subplot(sub[0, i])
            counts = np.asarray(pair.counts, dtype=float)
            cond = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            im = ax.imshow(100 * cond, cmap="magma", aspect="auto")
            la, lb = pair.layers
            ax.set_xlabel(f"expert in layer {lb}")
            ax.set_ylabel(f"expert in layer {la}")
            ax.set_title(f"co-activation {la} → {lb}: P(next | this), %", fontsize=10)
            fig.colorbar(im, ax=ax, fraction=0.04, label="% of tokens")
    return save_png(fig, out_png, dpi=90, bbox_inches="tight")


def save_png(fig: Any, out_png: str | Path, **savefig: Any) -> Path:
    """Write `fig` to `out_png` (folders made) and close it."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, **savefig)
    plt.close(fig)
    return out_png


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns, two spaces apart: the header (a name with a newline takes two lines), then one line
    per row."""
    names = [h.split("\n") for h in header]
    depth = max(len(n) for n in names)
    names = [[""] * (depth - len(n)) + n for n in names]
    widths = [max([len(x) for x in n] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*(n[d] for n in names)) for d in range(depth)] + [fmt.format(*row) for row in rows]


def summary_lines(report: ProfileReport) -> list[str]:
    """`moeflow profile`'s text: hit rates, then bytes and stall, two tables each within TEXT_WIDTH columns."""
    links = ", ".join(f"{_link_name(link)} {bw / 1e9:.3g} GB/s" for link, bw in report.links.items())
    cost = (f"MiB read per token (all reads / demand misses) and predicted stall per token: demand misses / link "
            f"bandwidth ({links}), prefetches assumed hidden:")
    lines = ["hit rate per policy and budget, overall and per MoE layer:", *text_table(*_hit_table(report)), "",
             *textwrap.wrap(cost, TEXT_WIDTH), *text_table(*_cost_table(report))]
    header, rows = _live_table(report)
    if rows:
        lines += ["", "measured in the live engine (--live):", *text_table(header, rows)]
    line = takeaway(report)
    return lines + (["", *textwrap.wrap(line[0].upper() + line[1:] + ".", TEXT_WIDTH)] if line else [])


def compare_lines(a: ProfileReport, b: ProfileReport, label_a: str, label_b: str) -> list[str]:
    """Side by side: every (policy, budget) either report has, hit rates and bytes per token."""

    def index(report: ProfileReport) -> dict[tuple[str, float], RunRecord]:
        return {(run_label(r), round(r.budget, 6)): r for r in report.replayed}

    ia, ib = index(a), index(b)
    header = ["policy", "budget", "hit A", "hit B", "B - A", "MiB/tok A", "MiB/tok B"]
    rows = []
    for key in sorted(set(ia) | set(ib), key=lambda k: (k[0], k[1])):
        ra, rb = ia.get(key), ib.get(key)

        def pct(r: RunRecord | None) -> str:
            return f"{100 * r.hit_rate:.1f}%" if r else "-"

        def mib(r: RunRecord | None) -> str:
            return f"{r.bytes_per_token / 2**20:.2f}" if r else "-"

        delta = f"{100 * (rb.hit_rate - ra.hit_rate):+.1f} pt" if ra and rb else "-"
        rows.append([_short(key[0]), f"{100 * key[1]:g}%", pct(ra), pct(rb), delta, mib(ra), mib(rb)])
    return [f"A: {label_a}", f"B: {label_b}", *text_table(header, rows)]


def plot_compare(a: ProfileReport, b: ProfileReport, label_a: str, label_b: str, out_png: str | Path) -> Path:
    """Both reports' hit-rate curves in one plot: A solid, B dashed, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys([*_curves(a), *_curves(b)]))
    colors = _colors(labels)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    _plot_hit_rates(ax, a, colors, linestyle="-", suffix=" — A")
    _plot_hit_rates(ax, b, colors, linestyle=":", suffix=" — B")
    ax.set_xlabel("expert budget (% of all experts resident)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"A: {label_a}\nB: {label_b}", fontsize=10)
    for report, style, tag in ((a, "-", "A"), (b, ":", "B")):
        for label, (budgets, values) in _curves(report, lambda r: r.bytes_per_token).items():
            ax2.plot([100 * x for x in budgets], [v / 2**20 for v in values], linestyle=style, marker="o",
                     color=colors[label], label=f"{label} — {tag}")
    ax2.set_xlabel("expert budget (% of all experts resident)")
    ax2.set_ylabel("MiB read per token")
    ax2.grid(alpha=0.3)
    ax2.set_title("bytes moved per token (A solid, B dotted)")
    fig.tight_layout()
    return save_png(fig, out_png, dpi=100)
