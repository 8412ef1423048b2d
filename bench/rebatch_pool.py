"""How the re-batcher's pool size and fairness bound decide what a batch job reads.

At 25% on the I/O-bound bench model every decode step of a batch reads nearly all the distinct experts
it uses (B >= 8 uses more experts than the cache holds), so distinct experts per layer and step is the
job's read volume, and it depends only on the routing, which the I/O-bound model shares with the shipped
one. This counts it on the shipped model with every expert resident (no reads: seconds per setting),
over the same held-out prompts and token counts as ``bench/expertflow.py --part rebatch``: FIFO, and the
re-batcher over a grid of pool factors (pool = factor x batch) and `max_skips` (steps a sequence may be
left out in a row; ``default`` is `RebatchAdmission`'s). Every run's tokens must equal FIFO's (checked).
Tokens/s under real reads is ``bench/expertflow.py --part rebatch``.

    python bench/rebatch_pool.py

Writes ``rebatch_pool.json`` and ``rebatch_pool.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expertflow import heldout_prompts  # noqa: E402
from harness import machine  # noqa: E402


def sweep(
    prompts: list[list[int]], batches: list[int], factors: list[int], skips: list[str], tokens: int
) -> list[dict]:
    from moeflow.predictor.rebatch import RebatchAdmission

    import moeflow
    from moeflow.config import DEFAULT_MODEL
    from moeflow.scheduler import FifoAdmission, run_batch

    rows = []
    with moeflow.load(DEFAULT_MODEL, expert_budget="all") as engine:
        for B in batches:
            settings = [("fifo", None, None)] + [("rebatch", f, s) for f in factors for s in skips]
            fifo_tokens = None
            for admission, factor, skip in settings:
                if admission == "fifo":
                    policy = FifoAdmission()
                else:
                    options = {"pool_factor": factor} | ({} if skip == "default" else {"max_skips": int(skip)})
                    policy = RebatchAdmission.for_engine(engine, **options)
                t0 = time.perf_counter()
                run = run_batch(engine, prompts, batch_size=B, admission=policy, max_new_tokens=tokens)
                out = [r.token_ids for r in run.results]
                fifo_tokens = fifo_tokens or out
                row = {"batch_size": B, "admission": admission, "pool_factor": factor,
                       "max_skips": getattr(policy, "max_skips", None), "max_skips_setting": skip,
                       "steps": len(run.distinct_experts),
                       "distinct_experts_per_step": sum(run.distinct_experts) / len(run.distinct_experts),
                       "mean_batch": sum(run.batch_sizes) / len(run.batch_sizes),
                       "tokens_equal_fifo": out == fifo_tokens, "seconds": time.perf_counter() - t0}  # fmt: skip
                rows.append(row)
                print(f"B={B} {admission:>7} pool {factor or 1:>2}x max_skips {row['max_skips'] or '-':>3}: "
                      f"{row['distinct_experts_per_step']:5.2f} distinct experts per layer and step, {row['steps']} "
                      f"steps, tokens equal FIFO's: {row['tokens_equal_fifo']} ({row['seconds']:.0f} s)", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        rows = [r for r in result["rows"] if r["batch_size"] == B]
        fifo = next(r for r in rows if r["admission"] == "fifo")
        ax.axhline(fifo["distinct_experts_per_step"], color="#777", ls="--", label="FIFO")
        for skip in result["max_skips"]:
            pts = [r for r in rows if r["admission"] == "rebatch" and r["max_skips_setting"] == skip]
            ax.plot([r["pool_factor"] for r in pts], [r["distinct_experts_per_step"] for r in pts], "o-",
                    label=f"re-batcher, max_skips {'3 x factor (default)' if skip == 'default' else skip}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pool factor (pool = factor x batch)")
        ax.set_ylabel("distinct experts per layer and step")
        ax.set_title(f"batch {B}, {result['prompts']} prompts x {result['tokens']} tokens")
        ax.legend(fontsize=7)
    fig.suptitle("what a batch step reads at 25%: re-batcher pool and fairness bound (shipped model routing)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--max-skips", nargs="+", default=["8", "default"], help="integers, or 'default'")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    prompts = heldout_prompts(args.prompts)
    rows = sweep(prompts, args.batch_sizes, args.factors, args.max_skips, args.tokens)
    result = {"machine": machine(), "model": "shipped default model, every expert resident (routing only)",
              "prompts": len(prompts), "tokens": args.tokens, "batch_sizes": args.batch_sizes,
              "max_skips": args.max_skips, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rebatch_pool.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "rebatch_pool.png")
    if not all(r["tokens_equal_fifo"] for r in rows):
        raise SystemExit("some run's tokens differ from FIFO's")


if __name__ == "__main__":
    main()
