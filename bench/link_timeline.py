"""Where a decode's time goes, phase by phase, and where in it the link to the experts idles.

Each contender decodes held-out prompts greedily on a bench model at the expert budget, from disk, in a fresh
process inside the same cgroup memory limit as bench/expertflow.py's contenders, after the page cache is dropped.
The readers log every interval during which a read was in progress (`moeflow.offload.mover.BusyClock`, through
MOEFLOW_READ_LOG, which the reader process inherits); the compute thread logs its own events: a decode step's start
and end, each MoE layer's start, its routing, and every wait for its experts inside the layer. Each decode step
is then cut into phases (the step's start up to the first MoE layer; per layer: attention and router, stall, the
rest of its compute; the step's end) and both the time each phase takes and the link's idle time in it are summed,
in ms per decode token. On the I/O-bound model the link's idle time is what reads ahead could still fill.

    flock /tmp/moeflow-bench.lock python bench/link_timeline.py --contenders lru,predictive/path

Writes ``link_timeline.json`` and ``link_timeline.png``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expertflow import decode_child, heldout_prompts, memory_limit  # noqa: E402
from harness import drop_caches, machine, prepare_model, run_child, runtime_baseline_bytes  # noqa: E402

Event = tuple[float, str, int]  # (perf_counter seconds, kind, MoE layer or -1)


def options(contender: str) -> dict:
    """Engine options of a contender named as in bench/expertflow.py: lru, auto, predictive/<predictor>."""
    if contender in ("lru", "auto"):
        return {"policy": contender}
    policy, _, predictor = contender.partition("/")
    if policy != "predictive" or not predictor:
        raise SystemExit(f"unknown contender {contender!r}: lru, auto or predictive/<predictor>")
    return {"policy": "predictive", "predictor": predictor}


def child(spec: dict) -> dict:
    """One decode with the compute thread's events logged: F/E a decode step's start and end, B a MoE layer's start,
    R its routing, W0/W1 a wait for its experts (stall), H0/H1 within it the gate/up half of an expert whose down
    matrix is still being read (`ExpertCache.arrivals`' `on_gate_up`: compute)."""
    import moeflow
    from moeflow.offload.cache import ExpertCache

    events: list[Event] = []
    clock = time.perf_counter
    begin_layer = ExpertCache.begin_layer

    def logged_begin_layer(self: ExpertCache, layer: int) -> None:
        events.append((clock(), "B", layer))
        begin_layer(self, layer)

    arrivals = ExpertCache.arrivals.__wrapped__  # the generator under its @contextmanager

    @contextlib.contextmanager
    def logged_arrivals(
        self: ExpertCache, layer: int, experts: list[int], on_gate_up: Callable[[int, int], None] | None = None
    ) -> Iterator[Iterator[dict[int, int]]]:
        def logged_half(e: int, s: int) -> None:
            events.append((clock(), "H0", layer))
            on_gate_up(e, s)
            events.append((clock(), "H1", layer))

        half = None if on_gate_up is None else logged_half
        with contextlib.contextmanager(arrivals)(self, layer, experts, half) as batches:

            def waited() -> Iterator[dict[int, int]]:
                for_batches = iter(batches)
                while True:
                    t0 = clock()
                    batch = next(for_batches, None)
                    if batch is None:
                        return
                    events.extend(((t0, "W0", layer), (clock(), "W1", layer)))
                    yield batch

            yield waited()

    ExpertCache.begin_layer = logged_begin_layer
    ExpertCache.arrivals = logged_arrivals
    load = moeflow.load

    def logged_load(*args: object, **kwargs: object) -> object:
        engine = load(*args, **kwargs)
        decoding = engine.driver.before_forward.subscribe(
            lambda start: events.append((clock(), "F" if start.n_new == 1 else "P", -1)))
        ended = engine.driver.after_forward.subscribe(lambda start: events.append((clock(), "E", -1)))
        routed = engine.runtime.routing.subscribe(lambda e: events.append((clock(), "R", e.plan.layer)))
        for subscription in (decoding, ended, routed):
            engine.on_close(subscription.close)
        return engine

    moeflow.load = logged_load
    result = decode_child(spec)
    return {"events": events, "tokens_per_s": result["decode_tokens_per_s"],
            "bytes_per_token": result["decode_bytes_per_token"], "tokens": result["tokens"]}  # fmt: skip


def merge(intervals: list[tuple[float, float]]) -> list[list[float]]:
    """The union of `intervals`, sorted."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def busy_within(merged: list[list[float]], starts: list[float], a: float, b: float) -> float:
    """Seconds of [a, b] covered by `merged` (`starts`: their start times)."""
    i, busy = max(bisect.bisect_right(starts, a) - 1, 0), 0.0
    while i < len(merged) and merged[i][0] < b:
        busy += max(min(b, merged[i][1]) - max(a, merged[i][0]), 0.0)
        i += 1
    return busy


def phases(events: list[Event], busy: list[tuple[float, float]], layers: list[int]) -> dict:
    """{"steps", "ms_per_token", "idle_ms_per_token", "phases": {name: {"ms", "idle_ms"}}} over the decode steps
    followed by another (one forward of one new token a row, from its start to the next one's start)."""
    merged = merge(busy)
    starts = [m[0] for m in merged]
    names = {"F": "start", "E": "end"}
    order = ["start", *(f"L{p} {part}" for p in range(len(layers)) for part in ("attn+router", "stall", "compute")),
             "end"]  # fmt: skip
    pos = {layer: p for p, layer in enumerate(layers)}
    ms = dict.fromkeys(order, 0.0)
    idle = dict.fromkeys(order, 0.0)
    events = sorted(events)
    forwards = [i for i, e in enumerate(events) if e[1] in ("F", "P")]
    steps = 0
    for i, j in zip(forwards, forwards[1:]):
        if events[i][1] != "F" or events[j][1] != "F" or sum(e[1] == "B" for e in events[i:j]) != len(layers):
            continue  # a prefill, a sequence's last step (the next prompt's setup follows), or a forward cut short
        marks = []
        for t, kind, layer in events[i:j]:
            if kind in names:
                marks.append((t, names[kind]))
            elif kind == "B":
                marks.append((t, f"L{pos[layer]} attn+router"))
            elif kind in ("R", "W1", "H0"):
                marks.append((t, f"L{pos[layer]} compute"))
            elif kind in ("W0", "H1"):
                marks.append((t, f"L{pos[layer]} stall"))
        marks.append((events[j][0], ""))
        for (a, name), (b, _) in zip(marks, marks[1:]):
            ms[name] += b - a
            idle[name] += b - a - busy_within(merged, starts, a, b)
        steps += 1
    per = 1e3 / max(steps, 1)
    return {"steps": steps, "ms_per_token": sum(ms.values()) * per, "idle_ms_per_token": sum(idle.values()) * per,
            "phases": {n: {"ms": ms[n] * per, "idle_ms": idle[n] * per} for n in order}}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["contenders"]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 3.2 * len(rows)), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], rows.items()):
        names = list(row["phases"])
        total = [row["phases"][n]["ms"] for n in names]
        idle = [row["phases"][n]["idle_ms"] for n in names]
        ax.bar(names, [t - i for t, i in zip(total, idle)], color="#1f77b4", label="a read in progress")
        ax.bar(names, idle, bottom=[t - i for t, i in zip(total, idle)], color="#ddd", edgecolor="#999",
               label="link idle")  # fmt: skip
        ax.set_ylabel("ms per decode token")
        ax.set_title(f"{name}: {row['tokens_per_s']:.2f} tok/s, {row['ms_per_token']:.1f} ms a token, link idle "
                     f"{row['idle_ms_per_token']:.1f} ({row['idle_ms_per_token'] / row['ms_per_token']:.0%})",
                     fontsize=9)  # fmt: skip
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"where a decode token's time goes: {result['model']} at {result['budget']}, disk — {m['cpu']}, "
                 f"{m['cores']} cores, {m['date']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="iobound", help="a bench model: iobound, default or random")
    ap.add_argument("--contenders", type=lambda s: s.split(","), default=["lru", "predictive/path"])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/moeflow-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--pause", type=float, default=15.0, help="seconds idle before each run (the disk recovers)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from moeflow.model.checkpoint import open_checkpoint
    from moeflow.offload.mover import READ_LOG_ENV

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, args.workdir)
    layers = list(open_checkpoint(model).moe_layers)
    limit = memory_limit(model, args.budget, runtime_baseline_bytes())
    prompts = heldout_prompts(args.prompts)
    result: dict = {"machine": machine(), "command": " ".join(sys.argv), "model": args.model, "budget": args.budget,
                    "contenders": {}}  # fmt: skip
    tokens = None
    for name in args.contenders:
        spec = {"model": str(model), "budget": args.budget, "options": options(name), "prompts": prompts,
                "tokens": args.tokens, "record_routing": False}  # fmt: skip
        with tempfile.NamedTemporaryFile(suffix=".log") as log:
            time.sleep(args.pause)
            drop_caches()
            os.environ[READ_LOG_ENV] = log.name
            try:
                row = run_child([sys.executable, __file__, "--child", json.dumps(spec)], limit_bytes=limit,
                                timeout_s=3600)
            finally:
                del os.environ[READ_LOG_ENV]
            busy = [tuple(map(float, line.split())) for line in Path(log.name).read_text().splitlines()]
        if "error" in row:
            raise SystemExit(f"{name} failed: {row['error']}")
        if tokens is not None and row["tokens"] != tokens:
            raise SystemExit(f"{name}'s tokens differ from {args.contenders[0]}'s")
        tokens = row["tokens"]
        result["contenders"][name] = {"tokens_per_s": row["tokens_per_s"],
                                      "mib_per_token": row["bytes_per_token"] / 2**20,
                                      **phases(row["events"], busy, layers)}  # fmt: skip
        r = result["contenders"][name]
        print(f"{name}: {r['tokens_per_s']:.2f} tok/s, {r['mib_per_token']:.1f} MiB a token, {r['ms_per_token']:.2f} "
              f"ms a token, link idle {r['idle_ms_per_token']:.2f}", flush=True)  # fmt: skip
        for phase, v in r["phases"].items():
            print(f"  {phase:>16}: {v['ms']:6.2f} ms, idle {v['idle_ms']:6.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "link_timeline.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "link_timeline.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
