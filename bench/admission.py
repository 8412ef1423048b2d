"""Prefetch admission, replayed: hit rate and bytes read per token for lru, belady and predictive before/after.

Three models, the ones bench/expertflow.py times live:

- ``default``: the shipped model over its held-out text (never trained on), predictions of gate,
  path and token_freq recorded with the trace (`moeflow.tools.trace`, probabilities included).
- ``iobound``: the shipped model zero-widened to 8192 (`moeflow.tools.widen`): the same routing and
  predictions, so the same trace; replay needs only the geometry, so its bytes are the default
  model's scaled by the expert size. Only the overlap differs (below).
- ``random``: a Mixtral-shaped model with random weights (8 layers x 8 experts, top-2, hidden 1024,
  `moeflow.testing.save_tiny_checkpoint` with a char tokenizer) over the same held-out text, gate
  predictions; bytes at bench/offload_decode.py's expert size (intermediate 2304).

Replay is deterministic and reads nothing (`moeflow.tools.profile.replay`). ``predictive-before``
replays the prefetcher of `--baseline` (rank-only: every offered expert is read ahead) in a git
worktree of that commit; ``predictive-after`` replays this tree's admission with the overlap the
live engine would measure on this machine for that model (`OverlapEstimate`'s formula: lookahead x
compute per MoE layer / demand-read time, from an LRU decode at 25% from disk, measured here first
on each model: built in `--workdir` on demand). Prefetch width 4 for both, as in issue 13's figures.
``oracle`` is this tree's admission fed each token's true routing with probability 1: the best any
predictor of the current token can do (it cannot know the next token's routing, which Belady does).
``horizon-h`` is demand eviction that knows the next h tokens' routing exactly (h = 1, 2, 4): how much
future a predictor would need to know for its bytes to come near Belady's. ``predictive-reuse`` is
``predictive-after`` evicting by the shipped model's trained reuse model (`moeflow.offload.reuse`, trained
to answer 4 tokens ahead), as the engine does with the shipped predictors (the random model has none).

    .venv/bin/python bench/admission.py --out bench/results

Writes ``admission.json`` and ``admission.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import WIDE_INTERMEDIATE, checkout, machine, prepare_model  # noqa: E402

from moeflow.options import add_options, options_from_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = "admission"
MIXTRAL_INTERMEDIATE = 2304  # bench/offload_decode.py's random Mixtral-shaped model
MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Settings:
    budgets: str = field(default="12.5%,25%,50%", metadata={"help": "expert budgets, comma-separated"})
    width: int = field(default=4, metadata={"help": "prefetch width (experts per token and layer considered)"})
    tokens: int = field(default=20_000, metadata={"help": "held-out tokens traced per model"})
    baseline: str = field(default="efc262b~1", metadata={"help": "commit of predictive-before (rank-only prefetch)"})
    decode_tokens: int = field(default=24, metadata={"help": "decode steps of the overlap measurement"})
    workdir: Path = field(default=Path("/tmp/moeflow-admission"), metadata={"help": "traces and built models"})
    out: Path = field(default=Path("bench/results"), metadata={"help": "folder for admission.json and .png"})


# ---- models, traces, the overlap the engine would measure -------------------------------------------------


def random_routing_model(workdir: Path) -> Path:
    """The random Mixtral-shaped model traced for its routing: a char tokenizer, so text can be traced."""
    from moeflow.testing import save_tiny_checkpoint

    out = workdir / "mixtral-random-chars"
    if not (out / "config.json").is_file():
        save_tiny_checkpoint("mixtral", out, tokenizer=True, num_experts=8, top_k=2, layers=8, hidden_size=1024,
                             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024)
    return out


def trace_of(model: Path, predictors: list[str], tokens: int, out: Path):
    from moeflow.predictor.apply import build_predictor

    import moeflow
    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus
    from moeflow.tools.trace import Trace, record_trace

    if not (out / "meta.json").is_file():
        with moeflow.load(model, expert_budget="all", store="ram") as engine:
            preds = [build_predictor(engine, p) for p in predictors]
            record_trace(engine, model_corpus(DEFAULT_MODEL, "heldout"), max_tokens=tokens, predictors=preds,
                         progress=False).save(out)
    return Trace.load(out)


def measured_overlap(model: Path, tokens: int) -> dict:
    """What `OverlapEstimate` would measure: lookahead x compute per MoE layer / demand-read time, LRU at 25%."""
    import moeflow
    from moeflow.config import DEFAULT_LOOKAHEAD

    prompt = list(range(3, 11))
    with moeflow.load(model, expert_budget="25%", store="disk", policy="lru") as engine:
        engine.generate(prompt, max_new_tokens=4)  # warm up
        engine.cache.reset_stats()
        t0 = time.perf_counter()
        engine.generate(prompt, max_new_tokens=tokens)
        wall = time.perf_counter() - t0
        s = engine.stats()
        layers = len(engine.checkpoint.moe_layers)
    compute_per_layer = (wall - s.stall_s) / (tokens * layers)
    read_s = s.stall_s / max(s.misses, 1)
    return {"overlap": DEFAULT_LOOKAHEAD * compute_per_layer / read_s, "compute_per_layer_s": compute_per_layer,
            "read_s": read_s, "misses": s.misses, "tokens": tokens}


# ---- replay, this tree and the baseline's ------------------------------------------------------------------


def with_oracle(trace):
    """`trace` plus the predictor no real one can beat: each token's true experts of every layer, probability 1
    (it knows the current token's routing, never the next token's)."""
    from moeflow.tools.trace import Trace

    experts = np.asarray(trace.experts).astype(np.int16)
    meta = {**trace.meta, "predictions": {**trace.meta["predictions"], "oracle": {"lookahead": 1}}}
    return Trace(**{**trace.__dict__, "meta": meta, "predictions": {**trace.predictions, "oracle": experts},
                    "probabilities": {**trace.probabilities, "oracle": np.ones(experts.shape, np.float32)}})


HORIZONS = (1, 2, 4)  # tokens of future the horizon oracles know


def horizon_oracle(trace, geometry, budget, horizon: int):
    """Demand eviction that knows the next `horizon` tokens exactly: the victim is the resident expert its
    layer uses least often in them (never again in them: first), the least recently used among equals.
    What eviction could do with a perfect predictor of `horizon` tokens; Belady knows the whole future."""
    from moeflow.offload.layer import serve_layer
    from moeflow.offload.plans import RoutingPlan
    from moeflow.offload.policy import LRUPolicy
    from moeflow.tools.profile.replay import replay_cache

    experts_NLK = np.asarray(trace.experts)
    layers = list(geometry.layers)
    pos = {layer: i for i, layer in enumerate(layers)}
    clock = {"n": 0, "l": 0}

    class Horizon(LRUPolicy):
        def victim(self, candidates):
            n, here = clock["n"], clock["l"]

            def uses(key):
                i = pos[key[0]]
                start = n if i > here else n + 1  # its layer's next run: this token or the next
                return int((experts_NLK[start : start + horizon, i] == key[1]).any(axis=-1).sum())

            allowed = set(candidates)
            order = [k for k in self._order if k in allowed]  # least recently used first
            return min(order, key=uses)

    cache = replay_cache(geometry, budget.slots, Horizon())
    for n in range(trace.num_tokens):
        clock["n"] = n
        for i, layer in enumerate(layers):
            clock["l"] = i
            ids = tuple(sorted(set(experts_NLK[n, i].tolist())))
            serve_layer(cache, RoutingPlan(layer=layer, expert_ids=ids, num_tokens=1))
    return cache.stats()


def replay_rows(trace, geometry, budgets: str, predictors: list[str], width: int, overlap: float,
                reuse=None) -> list[dict]:
    from moeflow.tools.profile.replay import replay
    from moeflow.tools.profile.setting import parse_budgets

    rows = []
    oracle = with_oracle(trace)
    for point in parse_budgets(budgets, geometry):
        runs = [("lru", None), ("belady", None)] + [("predictive", p) for p in predictors]
        for policy, predictor in runs:
            r = replay(trace, geometry, policy=policy, budget=point, predictor=predictor, width=width, overlap=overlap)
            name = "predictive-after" if policy == "predictive" else policy
            rows.append(row(name, predictor, point.spec, r.stats, r.tokens, geometry.expert_bytes, r.prefetch))
            if policy == "predictive" and reuse is not None:
                r = replay(trace, geometry, policy=policy, budget=point, predictor=predictor, width=width,
                           overlap=overlap, reuse=reuse)
                rows.append(row("predictive-reuse", predictor, point.spec, r.stats, r.tokens, geometry.expert_bytes,
                                r.prefetch))
        r = replay(oracle, geometry, policy="predictive", budget=point, predictor="oracle", overlap=overlap)
        rows.append(row("oracle", "oracle", point.spec, r.stats, r.tokens, geometry.expert_bytes, r.prefetch))
        for h in HORIZONS:
            stats = horizon_oracle(trace, geometry, point, h)
            rows.append(row(f"horizon-{h}", None, point.spec, stats, trace.num_tokens, geometry.expert_bytes, None))
    return rows


def row(policy: str, predictor: str | None, budget: str, stats, tokens: int, expert_bytes: int,
        prefetch: dict | None) -> dict:
    return {"policy": policy, "predictor": predictor, "budget": budget, "hit_rate": stats.hit_rate,
            "mib_per_token": stats.bytes_read / tokens / MiB,
            "reads_per_token": stats.bytes_read / tokens / expert_bytes, "prefetch": prefetch}


BASELINE_CHILD = """
import json, sys
from moeflow.tools.profile.replay import replay
from moeflow.tools.profile.setting import Geometry, parse_budgets
from moeflow.tools.trace import Trace
a = json.loads(sys.argv[1])
trace, geometry = Trace.load(a["trace"]), Geometry(**{**a["geometry"], "layers": tuple(a["geometry"]["layers"])})
out = []
for point in parse_budgets(a["budgets"], geometry):
    for p in a["predictors"]:
        r = replay(trace, geometry, policy="predictive", budget=point, predictor=p, width=a["width"])
        out.append({"budget": point.spec, "predictor": p, "hit_rate": r.stats.hit_rate,
                    "bytes_read": r.stats.bytes_read, "tokens": r.tokens, "prefetch": r.prefetch})
print(json.dumps(out))
"""


def baseline_rows(tree: Path, trace_dir: Path, geometry, s: Settings, predictors: list[str]) -> list[dict]:
    arg = json.dumps({"trace": str(trace_dir), "geometry": asdict(geometry), "budgets": s.budgets,
                      "predictors": predictors, "width": s.width})
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", BASELINE_CHILD, arg], cwd=tempfile.gettempdir(), env=env,
                         capture_output=True, text=True, check=True).stdout
    return [{"policy": "predictive-before", "predictor": r["predictor"], "budget": r["budget"],
             "hit_rate": r["hit_rate"], "mib_per_token": r["bytes_read"] / r["tokens"] / MiB,
             "reads_per_token": r["bytes_read"] / r["tokens"] / geometry.expert_bytes, "prefetch": r["prefetch"]}
            for r in json.loads(out.strip().splitlines()[-1])]


# ---- the run ---------------------------------------------------------------------------------------------


def scaled(geometry, inter: int):
    """The same routing with experts of intermediate size `inter` (zero-widened or Mixtral-shaped, float32)."""
    return replace(geometry, inter=inter, expert_bytes=3 * inter * geometry.hidden * 4)


def run(s: Settings) -> dict:
    from moeflow.predictor.base import predictor_dir

    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.offload.reuse import ReuseModel
    from moeflow.tools.profile.setting import Geometry

    s.workdir.mkdir(parents=True, exist_ok=True)
    learned = ["path", "gate", "token_freq"]
    default_trace = trace_of(DEFAULT_MODEL, learned, s.tokens, s.workdir / "trace-default")
    random_model = random_routing_model(s.workdir)
    random_trace = trace_of(random_model, ["gate"], s.tokens, s.workdir / "trace-random")
    default_geometry = Geometry.of(open_checkpoint(DEFAULT_MODEL), default_trace.top_k)
    random_geometry = Geometry.of(open_checkpoint(random_model), random_trace.top_k)
    reuse = ReuseModel.load(predictor_dir(DEFAULT_MODEL), layers=default_geometry.layers,
                            num_experts=default_geometry.num_experts)
    models = {
        "default": (default_trace, s.workdir / "trace-default", default_geometry, learned, reuse),
        "iobound": (default_trace, s.workdir / "trace-default", scaled(default_geometry, WIDE_INTERMEDIATE), learned,
                    reuse),
        "random": (random_trace, s.workdir / "trace-random", scaled(random_geometry, MIXTRAL_INTERMEDIATE), ["gate"],
                   None),
    }
    result: dict = {"bench": BENCH, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                    "settings": {**asdict(s), "workdir": str(s.workdir), "out": str(s.out)}, "models": {}}
    with checkout(s.baseline) as tree:
        for name, (trace, trace_dir, geometry, predictors, reuse_model) in models.items():
            overlap = measured_overlap(prepare_model(name, s.workdir), s.decode_tokens)
            print(f"{name}: overlap {overlap['overlap']:.2f} (compute/layer {overlap['compute_per_layer_s'] * 1e3:.2f} "
                  f"ms, read {overlap['read_s'] * 1e3:.2f} ms)", flush=True)
            rows = replay_rows(trace, geometry, s.budgets, predictors, s.width, overlap["overlap"], reuse_model)
            rows += baseline_rows(tree, trace_dir, geometry, s, predictors)
            result["models"][name] = {"tokens": trace.num_tokens, "expert_mib": geometry.expert_bytes / MiB,
                                      "measured": overlap, "rows": rows}
    return result


def table(result: dict) -> str:
    lines = ["| model | budget | lru | belady | current-token oracle | predictor | predictive-before "
             "| predictive-after | predictive-reuse |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        by = {(r["policy"], r["predictor"], r["budget"]): r for r in m["rows"]}
        budgets = list(dict.fromkeys(r["budget"] for r in m["rows"]))
        preds = list(dict.fromkeys(r["predictor"] for r in m["rows"] if r["predictor"] not in (None, "oracle")))

        def cell(r: dict) -> str:
            return f"{r['hit_rate'] * 100:.1f}% / {r['mib_per_token']:.2f}"

        for b in budgets:
            for p in preds:
                lines.append(f"| {name} | {b} | {cell(by['lru', None, b])} | {cell(by['belady', None, b])} | "
                             f"{cell(by['oracle', 'oracle', b])} | {p} | {cell(by['predictive-before', p, b])} | "
                             f"{cell(by['predictive-after', p, b])} | "
                             + (cell(by["predictive-reuse", p, b]) if ("predictive-reuse", p, b) in by else "—") + " |")
    ahead = " | ".join(f"knows {h} token(s) ahead" for h in HORIZONS)
    lines += ["", f"| model | budget | lru | {ahead} | belady |", "|---|---|---|" + "---|" * len(HORIZONS) + "---|"]
    for name, m in result["models"].items():
        by = {(r["policy"], r["budget"]): r for r in m["rows"]}
        for b in dict.fromkeys(r["budget"] for r in m["rows"]):
            cells = [by[f"horizon-{h}", b]["mib_per_token"] for h in HORIZONS if (f"horizon-{h}", b) in by]
            if len(cells) == len(HORIZONS):
                lines.append(f"| {name} | {b} | {by['lru', b]['mib_per_token']:.2f} | "
                             + " | ".join(f"{c:.2f}" for c in cells) + f" | {by['belady', b]['mib_per_token']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2))
    colors = {"lru": "tab:gray", "belady": "black", "predictive-before": "tab:red", "predictive-after": "tab:green",
              "predictive-reuse": "tab:blue"}
    for ax, (name, m) in zip(axes, models.items()):
        best = "gate" if name == "random" else "path"
        budgets = list(dict.fromkeys(r["budget"] for r in m["rows"]))
        for i, policy in enumerate(colors):
            rows = {r["budget"]: r for r in m["rows"] if r["policy"] == policy and r["predictor"] in (None, best)}
            if not rows:  # no reuse model for this model
                continue
            xs = [j + (i - 2) * 0.17 for j in range(len(budgets))]
            ys = [rows[b]["mib_per_token"] for b in budgets]
            label = policy if policy in ("lru", "belady") else f"{policy} ({best})"
            bars = ax.bar(xs, ys, width=0.17, color=colors[policy], label=label)
            for bar, b in zip(bars, budgets):
                ax.annotate(f"{rows[b]['hit_rate'] * 100:.0f}%", (bar.get_x() + 0.085, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_title(f"{name}: overlap {m['measured']['overlap']:.2f}, {m['expert_mib']:.2f} MiB/expert")
        ax.set_ylabel("MiB read per token (label: hit rate)")
        ax.legend(fontsize=7)
    fig.suptitle(f"prefetch admission, replay of held-out text, width {result['settings']['width']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, Settings)
    s = options_from_args(Settings, parser.parse_args(argv))
    result = run(s)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / f"{BENCH}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, s.out / f"{BENCH}.png")
    print("hit rate / MiB read per token\n" + table(result))
    print(f"wrote {s.out / (BENCH + '.json')} and {s.out / (BENCH + '.png')}")


if __name__ == "__main__":
    main()
