"""ExpertFlow core on the default model: predictive prefetch vs LRU/LFU, and the token re-batcher vs FIFO.

Two parts, each side by side in one process with interleaved rounds (best round kept), prompts cut
from the held-out corpus files, experts read from disk with O_DIRECT:

- ``decode``: greedy decode tokens/s, one sequence at a time, at the given budget (default 25%) with
  ``--store disk``: lru, lfu, predictive with each predictor. Every contender's tokens must equal
  the lru run's (exactness is checked, not assumed).
- ``rebatch``: ``generate --prompts`` style batch generation at B = 8 and 32: FIFO vs the re-batcher;
  mean distinct experts per layer per decode step, tokens/s, cache hit rate; outputs must be equal.

    python bench/expertflow.py --out bench/results            # both parts
    python bench/expertflow.py --part rebatch --prompts 128    # one part, fewer prompts

Writes ``expertflow.json`` and ``expertflow.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow.predictor.apply import available_predictors  # noqa: E402

import moeflow  # noqa: E402
from moeflow.build import make_admission  # noqa: E402
from moeflow.model.corpus import model_corpus  # noqa: E402
from moeflow.scheduler import run_batch  # noqa: E402


def heldout_prompts(tokenizer: object, n: int, prompt_tokens: int) -> list[str]:
    """`n` prompts of about `prompt_tokens` tokens, cut at line starts across the held-out files."""
    prompts: list[str] = []
    files = model_corpus(moeflow.engine.DEFAULT_MODEL, "heldout")
    while len(prompts) < n:
        for f in files:
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
            step = max(len(lines) // max(n // len(files), 1), 8)
            for i in range(len(prompts) % 7, len(lines), step):
                ids = tokenizer("".join(lines[i : i + 12]), add_special_tokens=False)["input_ids"][:prompt_tokens]
                text = tokenizer.decode(ids)
                if len(ids) >= prompt_tokens // 2 and text.strip():
                    prompts.append(text)
                if len(prompts) >= n:
                    return prompts
    return prompts


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def decode_part(args: argparse.Namespace) -> dict:
    predictors = [p for p in ("gate", "path", "token_freq") if p in available_predictors(args.model)]
    with moeflow.load(args.model) as probe:
        prompts = heldout_prompts(probe.tokenizer, args.decode_prompts, 24)
        k = probe.top_k
    contenders = [("lru", {"policy": "lru"}), ("lfu", {"policy": "lfu"})]
    for p in predictors:
        for width in (k, 2 * k):
            options = {"policy": "predictive", "predictor": p, "lookahead": args.lookahead, "prefetch_width": width}
            contenders.append((f"predictive/{p} w={width}", options))
    best: dict[str, dict] = {}
    reference: list[list[int]] | None = None
    for rnd in range(args.repeats):
        for name, options in contenders:
            with moeflow.load(args.model, expert_budget=args.budget, store="disk", **options) as engine:
                t0 = time.perf_counter()
                outs = [engine.generate(p, max_new_tokens=args.tokens).token_ids for p in prompts]
                elapsed = time.perf_counter() - t0
                stats = engine.stats()
                counters = engine.prefetcher.counters.to_dict() if engine.prefetcher else None
            if reference is None:
                reference = outs
            tokens = sum(len(o) for o in outs)
            row = {
                "name": name, "tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
                "hit_rate": stats.hit_rate, "misses": stats.misses, "prefetch_hits": stats.prefetch_hits,
                "wasted_prefetches": stats.wasted_prefetches, "bytes_read": stats.bytes_read,
                "stall_s": stats.stall_s, "prefetch": counters, "exact": outs == reference, "round": rnd,
            }
            print(f"[decode round {rnd}] {name:>24}: {row['tokens_per_s']:6.1f} tok/s  hit {stats.hit_rate:.3f}  "
                  f"stall {stats.stall_s:.2f}s  exact={row['exact']}", file=sys.stderr)
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
    return {"budget": args.budget, "store": "disk", "prompts": len(prompts), "max_new_tokens": args.tokens,
            "lookahead": args.lookahead, "contenders": [best[n] for n, _ in contenders]}


def rebatch_part(args: argparse.Namespace) -> dict:
    with moeflow.load(args.model) as probe:
        prompts = heldout_prompts(probe.tokenizer, args.prompts, 24)
    rows = []
    for batch in args.batch_sizes:
        outputs: dict[str, list[list[int]]] = {}
        best: dict[str, dict] = {}
        for rnd in range(args.repeats):
            for admission in ("fifo", "rebatch"):
                with moeflow.load(args.model, expert_budget=args.budget, store="disk", policy="lru") as engine:
                    run = run_batch(engine, prompts, batch_size=batch, admission=make_admission(admission, engine),
                                           max_new_tokens=args.rebatch_tokens)
                    stats = engine.stats()
                outputs[admission] = [r.token_ids for r in run.results]
                tokens = sum(len(r.token_ids) for r in run.results)
                row = {
                    "batch_size": batch, "admission": admission, "tokens": tokens, "elapsed_s": run.elapsed_s,
                    "tokens_per_s": tokens / run.elapsed_s,
                    "distinct_experts_per_step": sum(run.distinct_experts) / len(run.distinct_experts),
                    "steps": len(run.batch_sizes), "mean_batch": sum(run.batch_sizes) / len(run.batch_sizes),
                    "hit_rate": stats.hit_rate, "bytes_read": stats.bytes_read, "round": rnd,
                }
                print(f"[rebatch B={batch} round {rnd}] {admission:>8}: distinct {row['distinct_experts_per_step']:.2f}"
                      f"  {row['tokens_per_s']:6.1f} tok/s  hit {stats.hit_rate:.3f}", file=sys.stderr)
                if admission not in best or row["tokens_per_s"] > best[admission]["tokens_per_s"]:
                    best[admission] = row
        fifo, reb = best["fifo"], best["rebatch"]
        rows.append({
            "batch_size": batch, "fifo": fifo, "rebatch": reb, "exact": outputs["fifo"] == outputs["rebatch"],
            "distinct_reduction": 1 - reb["distinct_experts_per_step"] / fifo["distinct_experts_per_step"],
            "speedup": reb["tokens_per_s"] / fifo["tokens_per_s"],
        })
    return {"budget": args.budget, "store": "disk", "prompts": len(prompts), "max_new_tokens": args.rebatch_tokens,
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("decode", "rebatch") if p in result]
    fig, axes = plt.subplots(1, len(parts) * 2 if "rebatch" in parts else 2, figsize=(6 * len(parts) + 4, 4.2))
    axes = list(axes)
    if "decode" in result:
        d = result["decode"]
        names = [c["name"] for c in d["contenders"]]
        ax = axes.pop(0)
        ax.bar(names, [c["tokens_per_s"] for c in d["contenders"]], color="tab:blue")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode, experts on disk, budget {d['budget']}")
        ax.tick_params(axis="x", rotation=30)
        ax = axes.pop(0)
        ax.bar(names, [c["hit_rate"] for c in d["contenders"]], color="tab:green")
        ax.set_ylim(0, 1)
        ax.set_ylabel("cache hit rate (prefetched counts as hit)")
        ax.tick_params(axis="x", rotation=30)
    if "rebatch" in result:
        r = result["rebatch"]
        labels = [f"B={row['batch_size']}" for row in r["rows"]]
        x = range(len(labels))
        ax = axes.pop(0)
        ax.bar([i - 0.2 for i in x], [row["fifo"]["distinct_experts_per_step"] for row in r["rows"]], 0.4, label="fifo")
        ax.bar([i + 0.2 for i in x], [row["rebatch"]["distinct_experts_per_step"] for row in r["rows"]], 0.4,
               label="re-batcher")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("distinct experts per layer per step")
        ax.set_title("token re-batcher")
        ax.legend()
        ax = axes.pop(0)
        ax.bar([i - 0.2 for i in x], [row["fifo"]["tokens_per_s"] for row in r["rows"]], 0.4, label="fifo")
        ax.bar([i + 0.2 for i in x], [row["rebatch"]["tokens_per_s"] for row in r["rows"]], 0.4, label="re-batcher")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel(f"tokens/s (disk, budget {r['budget']})")
        ax.legend()
    fig.suptitle(f"moeflow ExpertFlow core, default model — {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=moeflow.engine.DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--part", choices=("decode", "rebatch", "all"), default="all")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="decode: new tokens per prompt")
    parser.add_argument("--decode-prompts", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=256, help="rebatch: prompts in the batch job")
    parser.add_argument("--rebatch-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of each contender is kept")
    args = parser.parse_args()
    result: dict = {"machine": machine(), "command": " ".join(sys.argv)}
    if args.part in ("decode", "all"):
        result["decode"] = decode_part(args)
    if args.part in ("rebatch", "all"):
        result["rebatch"] = rebatch_part(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expertflow.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "expertflow.png")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
