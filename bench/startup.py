"""Start-up time of the command line: `moeflow --help`, `moeflow client --help`, `import moeflow.serve.client`.

Each command runs in a fresh interpreter, `--runs` times after `--warmup` untimed runs; the wall time of
the whole process is what a user waits. `--baseline COMMIT` also times that commit's tree (checked out
with `git worktree` into a temporary folder, removed afterwards) in the same run, commands interleaved,
so the two trees see the same machine load. Writes bench/results/startup.json and startup.png.

    .venv/bin/python bench/startup.py --baseline 69dd401
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeflow.options import add_options, options_from_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import checkout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = "startup"
# What the `moeflow` console script runs; `-c` keeps it the same for both trees.
ENTRY = "import sys; from moeflow.cli import main; sys.exit(main())"
COMMANDS: dict[str, list[str]] = {
    "moeflow --help": ["-c", ENTRY, "--help"],
    "moeflow client --help": ["-c", ENTRY, "client", "--help"],
    "import moeflow.serve.client": ["-c", "import moeflow.serve.client"],
}
HEAVY = ("torch", "transformers", "numpy", "grpc")


@dataclass(frozen=True, kw_only=True)
class Settings:
    runs: int = field(default=15, metadata={"help": "timed runs per command and tree"})
    warmup: int = field(default=2, metadata={"help": "untimed runs first (page cache, .pyc files)"})
    baseline: str = field(default="", metadata={"help": "also time this commit's tree, e.g. 69dd401"})
    out: Path = field(default=Path("bench/results"), metadata={"help": "folder for startup.json and startup.png"})


def run_once(tree: Path, argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def heavy_imports(tree: Path, argv: list[str], cwd: Path) -> list[str]:
    """Which of HEAVY the command imported (`sys.modules` at exit, SystemExit from --help included)."""
    loaded = f"sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})"
    probe = f"import atexit, json, sys\natexit.register(lambda: print(json.dumps({loaded})))\n{argv[1]}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", probe, *argv[2:]], cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(trees: dict[str, Path], s: Settings) -> list[dict]:
    cwd = Path(tempfile.mkdtemp(prefix="moeflow-startup-cwd-"))  # not the repository: '' on sys.path finds nothing
    times: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in COMMANDS}
    for _ in range(s.warmup):
        for tree in trees.values():
            for argv in COMMANDS.values():
                run_once(tree, argv, cwd)
    for _ in range(s.runs):  # interleaved: a burst of load on the machine hits every command alike
        for label, tree in trees.items():
            for command, argv in COMMANDS.items():
                times[label, command].append(run_once(tree, argv, cwd))
    return [
        {
            "tree": label,
            "command": command,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "runs_s": ts,
            "imports": heavy_imports(trees[label], COMMANDS[command], cwd),
        }
        for (label, command), ts in times.items()
    ]


def hardware() -> dict[str, object]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = list(dict.fromkeys(r["tree"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(COMMANDS)))
    height = 0.8 / len(trees)
    for i, tree in enumerate(trees):
        mine = [next(r for r in rows if r["tree"] == tree and r["command"] == c) for c in COMMANDS]
        ys = [k + i * height for k in range(len(COMMANDS))]
        med = [r["median_s"] for r in mine]
        err = [[m - r["min_s"] for m, r in zip(med, mine)], [r["max_s"] - m for m, r in zip(med, mine)]]
        ax.barh(ys, med, height=height, xerr=err, label=tree, capsize=3)
        for y, m, r in zip(ys, med, mine):
            ax.text(r["max_s"] * 1.1, y, f"{m:.2f} s", va="center", fontsize=8)
    ax.set_yticks([k + height * (len(trees) - 1) / 2 for k in range(len(COMMANDS))], list(COMMANDS))
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the process, s (median; bars: min to max)")
    hw = hardware()
    ax.set_title(f"moeflow start-up on {hw['cpu']} ({hw['cores']} cores)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _describe(commit: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, Settings)
    s = options_from_args(Settings, parser.parse_args(argv))
    with checkout(s.baseline) if s.baseline else nullcontext() as old:
        trees = {f"this tree ({_describe('HEAD')}, working tree)": REPO}
        if old is not None:
            trees = {f"baseline {_describe(s.baseline)}": old, **trees}
        rows = measure(trees, s)
    s.out.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": BENCH,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {**asdict(s), "out": str(s.out)},
        "hardware": hardware(),
        "rows": rows,
    }
    (s.out / f"{BENCH}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, s.out / f"{BENCH}.png")
    for r in rows:
        print(f"{r['tree']:>36}  {r['command']:<28} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  "
              f"imports {', '.join(r['imports']) or '-'}")  # fmt: skip
    print(f"wrote {s.out / (BENCH + '.json')} and {s.out / (BENCH + '.png')}")


if __name__ == "__main__":
    main()
