"""Reads straight into slots against reads through a buffer: the I/O-bound model in two layouts, side by side.

The same weights twice: as safetensors' own writer lays them out (offsets off whole pages, a Mixtral expert's w1, w2,
w3 back to back: each read goes to a buffer, then one `memmove` per piece into the slot; harness' "iobound-packed")
and as `moeflow align` rewrites that copy (every expert on whole pages in the slot's order: `DiskStore` reads gate and
up with O_DIRECT into the slot itself in one request, down in another; "iobound-packed-aligned"). LRU and predictive
path on each, greedy decode of held-out prompts at 25% from disk, page cache dropped, the same cgroup memory ceiling
for all, rounds interleaved (`bench/expertflow.py`'s harness); outputs must be equal.

    flock /tmp/moeflow-bench.lock python bench/direct_reads.py --repeats 3

Writes ``direct_reads.json`` and ``direct_reads.png`` (``--name``). ``bench/results/direct_reads.json`` was measured
before `moeflow align` existed, against `moeflow.tools.widen`'s layout of the same weights (the same order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import expertflow as ef  # noqa: E402
from harness import machine, prepare_model, runtime_baseline_bytes  # noqa: E402

CONTENDERS = {"lru": {"policy": "lru"}, "path": {"policy": "predictive", "predictor": "path"}}


def run(args: argparse.Namespace) -> dict:
    aligned = prepare_model("iobound-packed-aligned", args.workdir)
    models = {"buffered": prepare_model("iobound-packed", args.workdir), "direct": aligned}
    prompts = ef.heldout_prompts(args.prompts)
    limit = ef.memory_limit(aligned, "25%", runtime_baseline_bytes())
    jobs = [(f"{layout} {name}", {"kind": "decode", "model": str(model), "budget": "25%", "options": options,
                                  "prompts": prompts, "tokens": args.tokens, "record_routing": False}, limit)
            for layout, model in models.items() for name, options in CONTENDERS.items()]  # fmt: skip
    best = ef.rounds(jobs, args.repeats, args.child_timeout)
    tokens = {json.dumps(row.get("tokens")) for row in best.values()}
    rows = {name: {k: row.get(k) for k in ("all_rounds_tokens_per_s", "decode_bytes_per_token", "stall_s",
                                           "decode_s", "decode_tokens", "error")}
            for name, row in best.items()}  # fmt: skip
    ratios = {}
    for name in CONTENDERS:
        buffered, direct = (rows[f"{layout} {name}"]["all_rounds_tokens_per_s"] for layout in ("buffered", "direct"))
        per_round = [d / b for b, d in zip(buffered, direct)]
        ratios[name] = {"per_round": per_round, "median": statistics.median(per_round)}
    return {"machine": machine(), "command": " ".join(sys.argv), "models": {k: str(v) for k, v in models.items()},
            "prompts": len(prompts), "max_new_tokens": args.tokens, "memory_limit_bytes": limit,
            "outputs_equal": len(tokens) == 1, "contenders": rows, "direct_over_buffered": ratios}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(CONTENDERS):
        for j, (layout, color) in enumerate([("buffered", "#999"), ("direct", "#1f77b4")]):
            speeds = result["contenders"][f"{layout} {name}"]["all_rounds_tokens_per_s"]
            x = i + (j - 0.5) * 0.38
            ax.bar(x, statistics.median(speeds), 0.36, color=color, label=layout if i == 0 else None)
            ax.plot([x] * len(speeds), speeds, "o", ms=3, color="k", alpha=0.6)
        r = result["direct_over_buffered"][name]["median"]
        ax.annotate(f"{r:.2f}x", (i, max(result["contenders"][f"direct {name}"]["all_rounds_tokens_per_s"]) * 1.03),
                    ha="center")  # fmt: skip
    ax.set_xticks(range(len(CONTENDERS)), list(CONTENDERS))
    ax.set_ylabel("decode tokens/s (median of rounds; dots: rounds)")
    m = result["machine"]
    ax.set_title(f"I/O-bound model, 25%, disk: reads into the slot vs through a buffer\n"
                 f"{m['cpu']}, {m['cores']} cores, {m['date']}", fontsize=9)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/moeflow-bench"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="direct_reads", help="the files written: NAME.json and NAME.png in --out")
    args = p.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{args.name}.png")
    print(json.dumps(result["direct_over_buffered"]), "outputs equal:", result["outputs_equal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
