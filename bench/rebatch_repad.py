"""Tokens/s of continuous batching (FIFO and the token re-batcher) before vs after re-padding only changed rows.

The re-batcher changes `DecodeBatch` membership almost every step; before, every change rebuilt
the whole left-padded batched KV cache and every step copied each member's history into a list.
This runs the same prompts (the shipped model's held-out text) through `run_batch` at B = 8 and 32,
FIFO and re-batcher, on the shipped model at 25%, in two trees (git worktrees of a baseline and a
candidate commit), each run a fresh child process, rounds interleaved, each contender's best round
kept. Every run's tokens must equal the same admission's in the other tree (checked).

    flock /tmp/moeflow-bench.lock python bench/rebatch_repad.py --baseline fb73414~1 --candidate HEAD

Writes ``rebatch_repad.json`` and ``rebatch_repad.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_tree_arguments, checkout, describe_commits, machine, run_in_tree, tree_commits  # noqa: E402


def child(spec: dict) -> dict:
    """One run: tokens/s of `run_batch` with one admission policy and batch size."""
    import moeflow
    from moeflow.build import make_admission
    from moeflow.scheduler import run_batch

    with moeflow.load(expert_budget=spec["budget"]) as engine:
        admission = make_admission(spec["admission"], engine)
        run = run_batch(engine, spec["prompts"], batch_size=spec["batch_size"], admission=admission,
                        max_new_tokens=spec["tokens"])  # fmt: skip
    tokens = [r.token_ids for r in run.results]
    n = sum(len(t) for t in tokens)
    return {"tokens_per_s": n / run.elapsed_s, "elapsed_s": run.elapsed_s, "generated": n,
            "steps": len(run.batch_sizes), "mean_batch": sum(run.batch_sizes) / max(len(run.batch_sizes), 1),
            "tokens": tokens}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    labels = [f"B={r['batch_size']}\n{r['admission']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["baseline"]["tokens_per_s"] for r in rows], 0.4, color="#999", label="baseline")
    ax.bar([x + 0.2 for x in xs], [r["candidate"]["tokens_per_s"] for r in rows], 0.4, color="#1f77b4",
           label="candidate: re-pad changed rows only")  # fmt: skip
    for x, r in zip(xs, rows):
        ax.text(x + 0.2, r["candidate"]["tokens_per_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"run_batch, shipped model at {result['budget']}, {result['prompts']} held-out prompts — "
                 f"{result['machine']['cpu']}", fontsize=8)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tree_arguments(ap)
    ap.add_argument("--prompts", type=int, default=128, help="held-out prompts (64-256)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each contender keeps its best")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    commits = tree_commits(ap, args)
    from expertflow import heldout_prompts

    prompts = heldout_prompts(args.prompts)
    jobs = [(B, admission) for B in args.batch_sizes for admission in ("fifo", "rebatch")]
    best: dict[tuple, dict] = {}
    with checkout(commits["baseline"]) as base, checkout(commits["candidate"]) as cand:
        trees = {"baseline": base, "candidate": cand}
        for _ in range(args.rounds):
            for B, admission in jobs:
                for tree, root in trees.items():
                    spec = {"budget": args.budget, "prompts": prompts, "tokens": args.tokens, "batch_size": B,
                            "admission": admission}  # fmt: skip
                    row = run_in_tree(__file__, root, spec, timeout_s=1800)
                    key = (tree, B, admission)
                    if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = row
    rows = []
    for B, admission in jobs:
        b, c = best[("baseline", B, admission)], best[("candidate", B, admission)]
        rows.append({"batch_size": B, "admission": admission, "tokens_equal": b["tokens"] == c["tokens"],
                     "speedup": c["tokens_per_s"] / b["tokens_per_s"],
                     "baseline": {k: v for k, v in b.items() if k != "tokens"},
                     "candidate": {k: v for k, v in c.items() if k != "tokens"}})  # fmt: skip
    fifo_equal = {B: best[("candidate", B, "fifo")]["tokens"] == best[("candidate", B, "rebatch")]["tokens"]
                  for B in args.batch_sizes}  # fmt: skip
    described = describe_commits(commits)
    result = {"machine": machine(), "model": "shipped default model", "budget": args.budget,
              "prompts": len(prompts), "max_new_tokens": args.tokens, "rounds": args.rounds, "commits": described,
              "rebatch_tokens_equal_fifo": fifo_equal, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rebatch_repad.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "rebatch_repad.png")
    for r in rows:
        print(f"B={r['batch_size']:>2} {r['admission']:>7}: {r['baseline']['tokens_per_s']:7.1f} -> "
              f"{r['candidate']['tokens_per_s']:7.1f} tok/s ({r['speedup']:.2f}x), tokens equal {r['tokens_equal']}")


if __name__ == "__main__":
    main()
