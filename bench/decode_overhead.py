"""What a user of the shipped model feels: decode tokens/s of plain transformers against moeflow, before vs after.

The shipped model is small and compute-bound, so what the engine does around the model's own forward (the
offload hooks, the eviction policy's bookkeeping, sampling) is what sets its speed against plain transformers.
Contenders, all greedy with the model's generation defaults (repetition penalty 1.2) on the same held-out prompts:
transformers' `generate` on the model as it is, and moeflow (`moeflow.load`, the default policy) with a budget that
holds every expert and with 25% of them (the rest read from disk). A baseline commit and a candidate commit, each a
temporary git worktree run in its own child process, interleaved round by round; within a child the contenders
alternate, and each keeps its best pass. Transformers runs in every child: moeflow / transformers within one child
is the ratio to read, on this shared, noisy machine.

    flock /tmp/moeflow-bench.lock python bench/decode_overhead.py --baseline 5fe5d29 --candidate HEAD

Writes ``decode_overhead.json`` and ``decode_overhead.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_tree_arguments, checkout, describe_commits, machine, run_in_tree, tree_commits  # noqa: E402

CONTENDERS = ("transformers", "moeflow all", "moeflow 25%")


def child(spec: dict) -> dict:
    """One tree's tokens/s per contender: {contender: [tok/s of each pass]}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moeflow
    from moeflow.config import DEFAULT_MODEL

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in spec["prompts"]]
    new = spec["tokens"]
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    penalty = model.generation_config.repetition_penalty or 1.0
    engines = {"moeflow all": moeflow.load(expert_budget="all"), "moeflow 25%": moeflow.load(expert_budget="25%")}

    def with_transformers(ids: list[int]) -> int:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, repetition_penalty=penalty,
                                 pad_token_id=model.generation_config.pad_token_id)  # fmt: skip
        return out.shape[1] - len(ids)

    def with_engine(name: str) -> object:
        def run(ids: list[int]) -> int:
            return len(engines[name].generate(ids, max_new_tokens=new, temperature=0,
                                              repetition_penalty=penalty).token_ids)  # fmt: skip

        return run

    runs = {"transformers": with_transformers, **{name: with_engine(name) for name in engines}}
    try:
        for run in runs.values():  # warm up: first calls, buffers, the engines' caches
            run(prompts[0])
        out: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(spec["passes"]):
            for name, run in runs.items():
                t0 = time.perf_counter()
                tokens = sum(run(ids) for ids in prompts)
                out[name].append(tokens / (time.perf_counter() - t0))
    finally:
        for engine in engines.values():
            engine.close()
    return out


def heldout_prompts(n: int, chars: int = 200) -> list[str]:
    """`n` prompts cut from the shipped model's held-out files (each file's beginning)."""
    from moeflow.config import DEFAULT_MODEL
    from moeflow.model.corpus import model_corpus

    return [f.read_text(encoding="utf-8")[:chars] for f in model_corpus(DEFAULT_MODEL, "heldout")[:n]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.38
    for j, (tree, color) in enumerate([("baseline", "#777"), ("candidate", "#1f77b4")]):
        s = result["trees"][tree]
        xs = [i + (j - 0.5) * width for i in range(len(CONTENDERS))]
        bars = ax.bar(xs, [s["of_transformers"][c] for c in CONTENDERS], width, color=color,
                      label=f"{tree}: {s['commit'][:48]}")  # fmt: skip
        for x, c in zip(xs, CONTENDERS):  # each child's ratio
            ratios = [max(ch[c]) / max(ch["transformers"]) for ch in s["passes"]]
            ax.plot([x] * len(ratios), ratios, "o", ms=3, color="k", alpha=0.5)
        for bar, c in zip(bars, CONTENDERS):
            ax.annotate(f"{s['best'][c]:.0f} tok/s", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center",
                        va="bottom", fontsize=7, color="w")  # fmt: skip
    top = max(max(ch[c]) / max(ch["transformers"]) for s in result["trees"].values() for ch in s["passes"]
              for c in CONTENDERS)  # fmt: skip
    ax.set_ylim(0, top + 0.25)  # room for the legend above the dots
    ax.axhline(1.0, color="#d62728", lw=1, ls="--")
    ax.set_xticks(range(len(CONTENDERS)), CONTENDERS)
    ax.set_ylabel("tokens/s, x transformers' in the same child")
    ax.set_title(f"shipped model, greedy decode, {result['tokens']} new tokens x {len(result['prompts'])} prompts: "
                 f"median over {result['rounds']} children per tree (dots: each; label: best pass)\n"
                 f"{result['machine']['cpu']}", fontsize=8)  # fmt: skip
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tree_arguments(ap)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one child per tree each)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the prompts per contender within a child")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {"prompts": heldout_prompts(args.prompts), "tokens": args.tokens, "passes": args.passes}
    commits = tree_commits(ap, args)
    passes: dict[str, list[dict[str, list[float]]]] = {"baseline": [], "candidate": []}
    with checkout(commits["baseline"]) as base, checkout(commits["candidate"]) as cand:
        trees = {"baseline": base, "candidate": cand}
        for r in range(args.rounds):
            for tree in (list(trees) if r % 2 == 0 else list(trees)[::-1]):  # each tree first in every other round
                passes[tree].append(run_in_tree(__file__, trees[tree], spec, timeout_s=1800))
                print(f"round {r + 1}/{args.rounds} {tree}: "
                      + ", ".join(f"{c} {max(v):.1f}" for c, v in passes[tree][-1].items()), flush=True)  # fmt: skip
    described = describe_commits(commits)
    summary = {}
    for tree, children in passes.items():
        best = {c: max(max(ch[c]) for ch in children) for c in CONTENDERS}
        # moeflow / transformers within each child (the same minutes of this machine), median over the children
        ratio = {c: statistics.median(max(ch[c]) / max(ch["transformers"]) for ch in children) for c in CONTENDERS}
        summary[tree] = {"commit": described[tree], "passes": children, "best": best, "of_transformers": ratio}
    result = {
        "machine": machine(),
        "what": "decode tokens/s of the shipped model, greedy with its generation defaults (repetition penalty "
                "1.2): plain transformers generate, moeflow with a budget for every expert and with 25% (disk); "
                "best: the best pass of any child; of_transformers: median over the children of the child's best "
                "pass / its transformers' best pass",
        "prompts": spec["prompts"],
        "tokens": args.tokens,
        "rounds": args.rounds,
        "trees": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "decode_overhead.png")
    for tree, s in summary.items():
        print(f"{tree:>9} ({s['commit'][:50]}): " + ", ".join(
            f"{c} {s['best'][c]:.1f} tok/s ({s['of_transformers'][c]:.2f}x)" for c in CONTENDERS))  # fmt: skip


if __name__ == "__main__":
    main()
