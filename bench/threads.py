"""Compute threads x OpenMP wait policy: the README demo and a batch run, each setting a fresh process.

Settings: ``--threads 1`` and ``--threads 2`` under OMP_WAIT_POLICY=ACTIVE, PASSIVE and libgomp's own
default (OMP_WAIT_POLICY unset, GOMP_SPINCOUNT=300000: what libgomp does when neither is set, and it
keeps moeflow from choosing for you), plus ``auto``: no option and no variable, moeflow's choices.

- ``demo``: ``moeflow generate --prompt "def" --max-new-tokens 40 --expert-budget 25%`` (the shipped
  default model, disk store, O_DIRECT), tokens/s as the command reports it;
- ``batch``: ``moeflow generate --prompts`` with 32 prompts cut from the model's held-out files,
  ``--batch-size 8 --admission fifo``, same budget and store.

Rounds interleave the settings (the order rotates each round); the page cache is dropped before
every run. Each setting's median over rounds is compared with the best setting's median (on a shared,
loaded 2-core machine two identical settings differ by up to 25% in one round, so a best-of-rounds
picks outliers); best rounds and every round are in the JSON too. A run past ``--timeout`` counts
0 tokens/s and says so. Writes ``threads.json`` and ``threads.png``.

    flock /tmp/moeflow-bench.lock .venv/bin/python bench/threads.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import drop_caches, machine  # noqa: E402

from moeflow.config import DEFAULT_MODEL  # noqa: E402
from moeflow.model.corpus import model_corpus  # noqa: E402

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
WAIT = {"active": {"OMP_WAIT_POLICY": "ACTIVE"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
        "default": {"GOMP_SPINCOUNT": "300000"}}  # fmt: skip


def settings() -> list[tuple[str, list[str], dict[str, str]]]:
    rows = [("auto", [], {})]
    for threads in (1, 2):
        for wait, env in WAIT.items():
            rows.append((f"threads={threads} wait={wait}", ["--threads", str(threads)], env))
    return rows


def heldout_prompts(n: int, chars: int = 96) -> list[str]:
    """`n` prompts: a few consecutive lines from across the held-out files, escaped for a prompts file."""
    files = model_corpus(DEFAULT_MODEL, "heldout")
    prompts: list[str] = []
    per_file = -(-n // len(files))
    for f in files:
        lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        step = max(len(lines) // per_file, 3)
        for i in range(0, len(lines) - 3, step)[:per_file]:
            text = "\n".join(lines[i : i + 3])[:chars]
            prompts.append(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t"))
    return prompts[:n]


def run(cmd: list[str], env_extra: dict[str, str], timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES} | env_extra
    drop_caches()
    t0 = time.perf_counter()
    try:  # from this tree's root, so `moeflow` is the tree the bench lives in
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "timed_out": True, "tokens_per_s": 0.0}
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "tokens_per_s": 0.0}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": out["tokens_per_s"], "stall_s": out["cache"]["stall_s"], "wall_s": time.perf_counter() - t0,
            "tokens": out.get("tokens", len(out.get("token_ids", [])))}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in result["settings"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, workload in zip(axes, ("demo", "batch")):
        best = [s[workload]["median_tokens_per_s"] for s in result["settings"]]
        colors = ["tab:green" if n == "auto" else "tab:blue" for n in names]
        ax.barh(range(len(names)), best, color=colors)  # best = medians here
        for i, s in enumerate(result["settings"]):
            rounds = [r["tokens_per_s"] for r in s[workload]["rounds"]]
            ax.plot(rounds, [i] * len(rounds), "k.", ms=4)
            ax.annotate(f"{best[i]:.0f}", (best[i], i), xytext=(3, -3), textcoords="offset points", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ratio = result[workload]["auto_vs_best"]
        command = textwrap.fill(result[workload]["command"], 64)
        ax.set_title(f"{command}\nauto = {ratio:.2f}x the best setting (medians)", fontsize=8)
        ax.set_xlabel(f"tokens/s (bar: median of {result['rounds']} rounds; dots: every round)")
    m = result["machine"]
    fig.suptitle(f"moeflow compute threads x OpenMP wait policy, 25% budget, disk store — {m['cpu']}, "
                 f"{m['cores']} cores, {m['date']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=16, help="max new tokens per prompt of the batch run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run (a run past it counts 0 tok/s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    moeflow_cmd = [sys.executable, "-c", "import sys; from moeflow.cli import main; sys.exit(main())"]
    prompts_file = Path(tempfile.mkdtemp(prefix="moeflow-threads-")) / "prompts.txt"
    prompts_file.write_text("\n".join(heldout_prompts(args.prompts)) + "\n", encoding="utf-8")
    workloads = {
        "demo": [*moeflow_cmd, "generate", "--prompt", "def", "--max-new-tokens", "40", "--expert-budget", "25%"],
        "batch": [*moeflow_cmd, "generate", "--prompts", str(prompts_file), "--batch-size", "8", "--admission", "fifo",
                  "--max-new-tokens", str(args.batch_tokens), "--expert-budget", "25%"],
    }  # fmt: skip
    table = settings()
    rows: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        shift = rnd % len(table)
        for name, options, env in table[shift:] + table[:shift]:
            for workload, cmd in workloads.items():
                row = run([*cmd, *options, "--json"], env, args.timeout) | {"round": rnd}
                rows.setdefault((name, workload), []).append(row)
                print(f"[round {rnd}] {workload:>5} {name:>26}: {row['tokens_per_s']:7.1f} tok/s "
                      f"stall {row.get('stall_s', float('nan')):6.2f} s {row.get('error', '')[:200]}",
                      file=sys.stderr, flush=True)  # fmt: skip

    from moeflow.engine.engine import compute_threads

    result: dict = {"machine": machine(), "auto_threads": compute_threads(0), "rounds": args.rounds, "settings": []}
    for name, options, env in table:
        entry = {"name": name, "options": options, "env": env}
        for workload in workloads:
            runs = rows[(name, workload)]
            tps = [r["tokens_per_s"] for r in runs]
            entry[workload] = {"median_tokens_per_s": statistics.median(tps), "best_tokens_per_s": max(tps),
                               "rounds": runs}  # fmt: skip
        result["settings"].append(entry)
    for workload, cmd in workloads.items():
        best = max(result["settings"], key=lambda s: s[workload]["median_tokens_per_s"])
        auto = result["settings"][0][workload]["median_tokens_per_s"]
        result[workload] = {"command": shlex.join(["moeflow", *cmd[len(moeflow_cmd) :]]),
                            "best_setting": best["name"],
                            "auto_vs_best": auto / best[workload]["median_tokens_per_s"]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "threads.png")
    for s in result["settings"]:
        demo, batch = s["demo"]["median_tokens_per_s"], s["batch"]["median_tokens_per_s"]
        print(f"{s['name']:>26}: median demo {demo:7.1f}  batch {batch:7.1f} tok/s")
    for workload in workloads:
        w = result[workload]
        print(f"{workload}: best median {w['best_setting']}, auto = {w['auto_vs_best']:.3f}x best")


if __name__ == "__main__":
    main()
