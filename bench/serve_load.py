"""Bounded load on `moeflow serve` over loopback: FIFO admission vs the token re-batcher, same run.

The server runs as its own process (`python -m moeflow.cli serve`), started fresh for every mode so
each begins with an empty expert cache. `--clients` client threads, each with its own channel, keep
one streamed greedy request in flight each (closed loop) until `--requests` have been sent; the
server's queue holds every client (`--max-queue` = clients), so nothing should be refused. Every
reply is checked token for token against a solo `Engine.generate` of the same request (what
`moeflow generate` prints): a lost reply (an error, no final message) or a wrong one makes the
exit status 1.

Reports per mode: throughput (generated tokens/s and requests/s over the load's wall time),
p50/p99 latency and time to first token, batch occupancy (decode steps at each batch size, from
GetStats), distinct experts per decode step, cache hit rate over the load (per layer too), bytes
read, stall time, and the CPU seconds of server and clients (on a small machine the load generator
and the gRPC work take cores from the engine). `--rounds` interleave the modes; each mode's best
run is reported, every run is kept in the JSON. JSON + PNG.

    flock /tmp/moeflow-bench.lock python bench/serve_load.py                 # the shipped default model
    python bench/serve_load.py --model DIR --clients 8 --requests 32        # smaller, any model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

BENCH = "serve_load"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeflow.serve.client import MoeflowClient  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Request:
    index: int
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True, kw_only=True)
class Outcome:
    index: int
    ok: bool  # final message received, tokens equal the solo reference
    error: str  # gRPC status code name, "no final message", or "" when the reply came
    tokens: int
    latency_s: float  # request sent -> final message
    ttft_s: float  # request sent -> first message carrying tokens
    server_ttft_s: float  # the server's own: request taken -> first token (queueing + prefill)
    sent_s: float = 0.0  # when it was sent, from the start of the load


# ---- workload ---------------------------------------------------------------------------------------------------


def heldout_prompts(count: int, seed: int, min_chars: int, max_chars: int) -> list[str]:
    """Snippets of the default model's held-out corpus (whole stdlib files never trained on), cut at line starts."""
    from moeflow.model.corpus import model_corpus

    rng = random.Random(seed)
    files = model_corpus(ROOT / "moeflow" / "default_model", "heldout")
    prompts = []
    while len(prompts) < count:
        lines = rng.choice(files).read_text(encoding="utf-8").splitlines(keepends=True)
        start = rng.randrange(len(lines))
        text = "".join(lines[start : start + 12]).lstrip()
        cut = rng.randint(min_chars, max_chars)
        if len(text) >= min_chars and text.isascii():
            prompts.append(text[:cut])
    return prompts


def make_requests(prompts: list[str], count: int, max_new_tokens: int, seed: int) -> list[Request]:
    """`count` requests cycling over the prompts; each asks for between half and all of `max_new_tokens`."""
    rng = random.Random(seed)
    return [
        Request(
            index=i, prompt=prompts[i % len(prompts)], max_new_tokens=rng.randint(max_new_tokens // 2, max_new_tokens)
        )
        for i in range(count)
    ]


def solo_references(model: str | None, requests: list[Request]) -> dict[str, list[int]]:
    """Greedy tokens of each distinct prompt at the longest length asked. Greedy decoding is deterministic, so
    a request for n tokens must get the first n (fewer when the stop token comes first)."""
    import moeflow

    longest: dict[str, int] = {}
    for r in requests:
        longest[r.prompt] = max(longest.get(r.prompt, 0), r.max_new_tokens)
    with moeflow.load(model, expert_budget="all", store="ram") as engine:
        return {p: engine.generate(p, max_new_tokens=n).token_ids for p, n in longest.items()}


# ---- one mode: a fresh server, warm-up, the load ------------------------------------------------------------------


class ServerProcess:
    """`moeflow serve --port 0` as a child; its stderr is kept (and drained so it never blocks)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeflow.cli", "serve", "--port", "0", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.address: str | None = None
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                found = re.search(r"serving .* on (\S+) \(", line)
                if found:
                    self.address = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(600)
        if self.address is None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-20:]))

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system, all threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def run_load(address: str, requests: list[Request], refs: dict[str, list[int]], clients: int) -> list[Outcome]:
    start = time.perf_counter()
    todo = iter(requests)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client_loop() -> None:
        with MoeflowClient(address, timeout=600) as client:
            while True:
                with lock:
                    req = next(todo, None)
                if req is None:
                    return
                sent = time.perf_counter() - start
                outcome = one_request(client, req, refs[req.prompt][: req.max_new_tokens])
                outcomes.append(dataclasses.replace(outcome, sent_s=sent))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def one_request(client: MoeflowClient, req: Request, want: list[int]) -> Outcome:
    t0 = time.perf_counter()
    ttft, ids, final = 0.0, [], None
    try:
        for reply in client.stream(req.prompt, max_new_tokens=req.max_new_tokens):
            if reply.token_ids and not ids:
                ttft = time.perf_counter() - t0
            ids.extend(reply.token_ids)
            if reply.finish_reason:
                final = reply
    except grpc.RpcError as e:
        return Outcome(
            index=req.index,
            ok=False,
            error=e.code().name,
            tokens=len(ids),
            latency_s=0.0,
            ttft_s=0.0,
            server_ttft_s=0.0,
        )
    latency = time.perf_counter() - t0
    error = "" if final is not None else "no final message"
    return Outcome(
        index=req.index,
        ok=final is not None and ids == want,
        error=error,
        tokens=len(ids),
        latency_s=latency,
        ttft_s=ttft,
        server_ttft_s=final.time_to_first_token_s if final is not None else 0.0,
    )


def cache_delta(before: dict, after: dict) -> dict:
    """Hit rate per layer and overall over the load only (warm-up excluded)."""
    layers = []
    for b, a in zip(before["layers"], after["layers"]):
        hits, misses = a["hits"] - b["hits"], a["misses"] - b["misses"]
        layers.append({"layer": a["layer"], "hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1)})
    hits, misses = sum(x["hits"] for x in layers), sum(x["misses"] for x in layers)
    return {
        "hit_rate": hits / max(hits + misses, 1),
        "layers": layers,
        "bytes_read": after["bytes_read"] - before["bytes_read"],
        "stall_s": after["stall_s"] - before["stall_s"],
        "prefetch_accuracy_since_start": after["prefetch_accuracy"],
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_mode(admission: str, args: argparse.Namespace, requests: list[Request], refs: dict[str, list[int]]) -> dict:
    server_args = [
        "--admission", admission,
        "--max-batch-size", str(args.max_batch_size),
        "--max-queue", str(args.clients),
        "--expert-budget", args.expert_budget,
        "--store", args.store,
        "--policy", args.policy,
    ]  # fmt: skip
    if args.model is not None:
        server_args += ["--model", str(args.model)]
    print(f"[{admission}] starting the server ...", flush=True)
    try:
        server = ServerProcess(server_args)
    except RuntimeError as e:
        print(f"[{admission}] skipped: {e}", flush=True)
        return {"admission": admission, "error": str(e)}
    try:
        with MoeflowClient(server.address, timeout=600) as client:
            warm = [Request(index=-1, prompt=r.prompt, max_new_tokens=4) for r in requests[: args.max_batch_size]]
            run_load(server.address, warm, {r.prompt: refs[r.prompt] for r in warm}, len(warm))
            before = client.stats()
            cpu0, server_cpu0, t0 = time.process_time(), server.cpu_s(), time.perf_counter()
            outcomes = run_load(server.address, requests, refs, args.clients)
            wall = time.perf_counter() - t0
            client_cpu, server_cpu = time.process_time() - cpu0, server.cpu_s() - server_cpu0
            after = client.stats()
    finally:
        exit_status = server.stop()
    steps = {int(b): n - before["batch_size_steps"].get(b, 0) for b, n in after["batch_size_steps"].items()}
    steps = {b: n for b, n in sorted(steps.items()) if n}
    total_steps = sum(steps.values())
    mean_batch = sum(b * n for b, n in steps.items()) / max(total_steps, 1)
    # Distinct experts a step needs per MoE layer (what the re-batcher lowers), over the load's steps only.
    steps_before, steps_after = before["steps"], after["steps"]
    distinct = (after["mean_distinct_experts"] * steps_after - before["mean_distinct_experts"] * steps_before) / max(
        steps_after - steps_before, 1
    )
    done = [o for o in outcomes if not o.error]
    tokens = sum(o.tokens for o in done)
    latencies, ttfts = [o.latency_s for o in done], [o.ttft_s for o in done]
    row = {
        "admission": admission,
        "requests": len(requests),
        "completed": len(done),
        "lost": len(requests) - len(done),
        "wrong": sum(1 for o in done if not o.ok),
        "errors": sorted({o.error for o in outcomes if o.error}),
        "rejected_by_server": after["requests_rejected"] - before["requests_rejected"],
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(done) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "server_ttft_p50_s": percentile([o.server_ttft_s for o in done], 50),
        "server_ttft_p99_s": percentile([o.server_ttft_s for o in done], 99),
        "decode_steps": total_steps,
        "batch_size_steps": steps,
        "mean_batch_size": mean_batch,
        "mean_distinct_experts_per_step": distinct,
        "batch_occupancy": mean_batch / args.max_batch_size,
        "engine_busy_fraction": (after["busy_s"] - before["busy_s"]) / wall,
        "engine_ms_per_step": 1000 * (after["busy_s"] - before["busy_s"]) / max(total_steps, 1),
        # Both processes share the machine's cores: the load generator's CPU is taken from the engine.
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "cache": cache_delta(before, after),
        "server_exit_status": exit_status,
        "per_request": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(o).items()}
            for o in sorted(outcomes, key=lambda o: o.sent_s)
        ],
    }
    print(
        f"[{admission}] {row['completed']}/{row['requests']} replies, {row['wrong']} wrong, {row['lost']} lost; "
        f"{row['tokens_per_s']:.1f} tok/s, latency p50 {row['latency_p50_s']:.2f} s p99 {row['latency_p99_s']:.2f} s, "
        f"occupancy {row['batch_occupancy']:.0%}, {distinct:.2f} distinct experts per layer and step, "
        f"hit rate {row['cache']['hit_rate']:.1%}; engine {row['engine_ms_per_step']:.1f} ms/step; CPU s: server "
        f"{server_cpu:.0f}, clients {client_cpu:.0f} in {wall:.0f} s",
        flush=True,
    )
    return row


# ---- report -----------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    names = [r["admission"] for r in rows]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][: len(rows)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    ax = axes[0]
    ax.bar(names, [r["tokens_per_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        every = [x["tokens_per_s"] for x in result["runs"] if x["admission"] == r["admission"] and "error" not in x]
        ax.plot([i] * len(every), every, "k.", label="each round" if i == 0 else None)
    ax.legend(loc="lower right")
    ax.set_title("throughput (generated tokens/s), best round")
    ax = axes[1]
    width = 0.35
    for i, r in enumerate(rows):
        ax.bar([i - width / 2, i + width / 2], [r["latency_p50_s"], r["latency_p99_s"]], width, color=colors[i])
        ax.text(i - width / 2, r["latency_p50_s"], "p50", ha="center", va="bottom", fontsize=7)
        ax.text(i + width / 2, r["latency_p99_s"], "p99", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names)
    ax.set_title("request latency (s)")
    ax = axes[2]
    for i, r in enumerate(rows):
        steps = {int(b): n for b, n in r["batch_size_steps"].items()}  # JSON keys are strings
        total = max(sum(steps.values()), 1)
        ax.plot(sorted(steps), [steps[b] / total for b in sorted(steps)], "o-", color=colors[i], label=names[i])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("sequences in the decode step")
    ax.set_ylabel("fraction of steps")
    ax.set_title("batch occupancy")
    ax.legend()
    ax = axes[3]
    for i, r in enumerate(rows):
        layers = r["cache"]["layers"]
        ax.plot([x["layer"] for x in layers], [x["hit_rate"] for x in layers], "o-", color=colors[i], label=names[i])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, 1)
    ax.set_title("expert cache hit rate during the load")
    ax.legend()
    cfg, hw = result["config"], result["hardware"]
    skipped = "".join(
        f"\n{r['admission']} not run: {r['error'].strip().splitlines()[-1]}" for r in result["rows"] if "error" in r
    )
    fig.suptitle(
        f"moeflow serve on loopback ({result['model']}): {cfg['clients']} clients, {cfg['requests']} greedy requests "
        f"of <= {cfg['max_new_tokens']} tokens, batch <= {cfg['max_batch_size']}, expert budget {cfg['expert_budget']} "
        f"({cfg['store']}, {cfg['policy']}); {hw['cpu']} x{hw['cpus']}, {hw['date']}" + skipped,
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped default model)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, one request in flight each")
    parser.add_argument("--requests", type=int, default=320, help="requests per mode")
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts the requests cycle over")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="each request asks for [n/2, n] tokens")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--expert-budget", default="50%")
    parser.add_argument("--store", default="disk")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--admissions", default="fifo,rebatch", help="modes, in this order, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the modes; each mode's best run is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.prompts, args.rounds) < 1 or args.max_new_tokens < 2:
        parser.error("--clients, --requests, --prompts and --rounds must be >= 1 and --max-new-tokens >= 2")

    prompts = heldout_prompts(args.prompts, args.seed, min_chars=40, max_chars=160)
    requests = make_requests(prompts, args.requests, args.max_new_tokens, args.seed)
    t0 = time.perf_counter()
    refs = solo_references(str(args.model) if args.model else None, requests)
    print(f"solo references for {len(refs)} prompts in {time.perf_counter() - t0:.1f} s", flush=True)
    modes = [a.strip() for a in args.admissions.split(",") if a.strip()]
    # Rounds interleave the modes, and each mode's best run is its row: a shared machine's noise hits
    # runs, not modes. A mode that cannot start (the re-batcher without a trained predictor) is tried once.
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for mode in modes:
            if any(r["admission"] == mode and "error" in r for r in runs):
                continue
            print(f"round {rnd + 1}/{args.rounds}", end=" ", flush=True)
            runs.append({**run_mode(mode, args, requests, refs), "round": rnd + 1})
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["admission"] == mode]
        ok = [r for r in mine if "error" not in r]
        best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else mine[0]
        if ok:
            best = {
                **best,
                "lost_all_rounds": sum(r["lost"] for r in ok),
                "wrong_all_rounds": sum(r["wrong"] for r in ok),
            }
        rows.append(best)
    model = args.model if args.model is not None else ROOT / "moeflow" / "default_model"
    result = {
        "bench": BENCH,
        "model": str(model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "gpu": None,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": rows,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{BENCH}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{BENCH}.png")
    header = ("admission", "tok/s", "req/s", "p50 s", "p99 s", "occup.", "dist.", "hit")
    print("\nbest run of each mode; lost and wrong over all rounds")
    print("{:10s} {:>8s} {:>7s} {:>7s} {:>7s} {:>7s} {:>6s} {:>6s}  lost wrong".format(*header))
    for r in rows:
        if "error" in r:
            print(f"{r['admission']:10s}  not run: {r['error'].splitlines()[-1][:100]}")
            continue
        print(
            f"{r['admission']:10s} {r['tokens_per_s']:8.1f} {r['requests_per_s']:7.2f} {r['latency_p50_s']:7.2f} "
            f"{r['latency_p99_s']:7.2f} {r['batch_occupancy']:7.0%} {r['mean_distinct_experts_per_step']:6.2f} "
            f"{r['cache']['hit_rate']:6.1%}  "
            f"{r['lost_all_rounds']:4d} {r['wrong_all_rounds']:5d}"
        )
    print(f"wrote {args.out / BENCH}.json and .png")
    ran = [r for r in runs if "error" not in r]
    return 0 if ran and all(r["lost"] == 0 and r["wrong"] == 0 for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
