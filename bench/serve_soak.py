"""Soak `moeflow serve` on loopback with good, bad, slow and idle clients at once, for a bounded time.

The server runs as its own process (`python -m moeflow.cli serve`, small queue, short idle deadline). For
`--duration` seconds, client threads (each with its own channel) keep at it:

- good: streamed greedy requests over held-out prompts; every reply is checked token for token against a solo
  `Engine.generate` of the same request. A refusal because the server is full (RESOURCE_EXHAUSTED) is counted
  as refused; any other error, a reply without its final message, or a wrong token is *lost*;
- bad: requests the server must refuse, each with its status: empty prompt, too many tokens, bad temperature or
  top_p, a 900 KB prompt, unknown fields, corrupt bytes; and temperature=1e-40, which must be served;
- slow: streams read one message a second, or abandoned after a few (the client cancels);
- idle: calls that send their headers and never their message; the server must cut them (CANCELLED) at its
  idle deadline;
- a prober: health and GetStats once a second; each must answer SERVING within 2 s.

Reports requests served, refused with the right status (and any with a wrong one), lost (must be 0), probe
failures, and the server's resident memory over time (it should stay flat once warm: the slope of the second
half is reported). JSON + PNG in bench/results/serve_soak/. Exit status 1 when anything was lost, answered
with a wrong status, or a probe failed.

    python bench/serve_soak.py                     # 10 minutes, the shipped default model
    python bench/serve_soak.py --duration 150      # shorter
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

BENCH = "serve_soak"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import machine  # noqa: E402
from moeflow.serve.client import MoeflowClient, make_request  # noqa: E402
from moeflow.serve.proto import SERVICE_NAME, moeflow_pb2  # noqa: E402
from serve_load import ServerProcess, heldout_prompts  # noqa: E402

OK, FULL = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


class Tally:
    """Outcomes by client kind and what happened, with the time of each (for the plot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.events: list[tuple[float, str, str]] = []
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, kind: str, outcome: str, t: float, example: str = "") -> None:
        with self._lock:
            self.counts[(kind, outcome)] += 1
            self.events.append((t, kind, outcome))
            if example and (kind, outcome) not in self.examples:
                self.examples[(kind, outcome)] = example[:300]


# ---- the clients ----------------------------------------------------------------------------------------------


def good_client(address: str, work: list[tuple[str, int, list[int]]], tally: Tally, t0: float, end: float) -> None:
    with MoeflowClient(address, timeout=120) as c:
        i = 0
        while time.monotonic() < end:
            prompt, n, want = work[i % len(work)]
            i += 1
            ids, final = [], None
            try:
                for reply in c.stream(prompt, max_new_tokens=n):
                    ids.extend(reply.token_ids)
                    final = reply if reply.finish_reason else final
            except grpc.RpcError as e:
                outcome = "refused (server full)" if e.code() == FULL else "lost"
                tally.add("good", outcome, time.monotonic() - t0, f"{e.code().name}: {e.details()}")
                time.sleep(0.2 if e.code() == FULL else 0)
                continue
            if final is None:
                tally.add("good", "lost", time.monotonic() - t0, "no final message")
            elif ids != want[: len(ids)] or (final.finish_reason == "length" and len(ids) != n):
                tally.add("good", "wrong tokens", time.monotonic() - t0, f"{prompt!r}: {ids} != {want}")
            else:
                tally.add("good", "served", time.monotonic() - t0)


def bad_requests() -> list[tuple[str, Callable[[grpc.Channel], object], grpc.StatusCode]]:
    """(name, call, the status it must get)."""

    def generate(**kw: object) -> Callable[[grpc.Channel], object]:
        prompt = kw.pop("prompt", "def ")
        body = make_request(prompt, **kw).SerializeToString()
        return lambda ch: ch.unary_unary(f"/{SERVICE_NAME}/GenerateUnary")(body, timeout=60)

    def raw(body: bytes) -> Callable[[grpc.Channel], object]:
        return lambda ch: ch.unary_unary(f"/{SERVICE_NAME}/GenerateUnary")(body, timeout=60)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    unknown_field = moeflow_pb2.GenerateRequest(prompt="hi").SerializeToString() + bytes([0x98, 0x06, 0x01])
    return [
        ("empty prompt", generate(prompt=""), invalid),
        ("max_new_tokens over the limit", generate(max_new_tokens=10**6), invalid),
        ("negative temperature", generate(temperature=-1.0), invalid),
        ("top_p 2", generate(top_p=2.0), invalid),
        ("900 KB prompt", generate(prompt="x" * 900_000, max_new_tokens=2), invalid),
        ("unknown field", raw(unknown_field), invalid),
        ("corrupt bytes", raw(b"\xff\xff\xff"), invalid),
        ("temperature 1e-40 (valid)", generate(temperature=1e-40, max_new_tokens=4), OK),
    ]


def bad_client(address: str, tally: Tally, t0: float, end: float) -> None:
    cases = bad_requests()
    with grpc.insecure_channel(address) as channel:
        i = 0
        while time.monotonic() < end:
            name, call, want = cases[i % len(cases)]
            i += 1
            try:
                call(channel)
                got, details = OK, ""
            except grpc.RpcError as e:
                got, details = e.code(), e.details()
            if got == FULL and want == OK:
                tally.add("bad", "refused (server full)", time.monotonic() - t0)
            elif got == want:
                tally.add("bad", "served" if want == OK else "refused, right status", time.monotonic() - t0)
            else:
                tally.add(
                    "bad", "wrong status", time.monotonic() - t0, f"{name}: {got.name} ({details}), want {want.name}"
                )


def slow_client(address: str, prompt: str, tally: Tally, t0: float, end: float) -> None:
    with MoeflowClient(address, timeout=300) as c:
        i = 0
        while time.monotonic() < end:
            i += 1
            abandon = i % 2 == 0
            stream = c.stream(prompt, max_new_tokens=24)
            try:
                for k, reply in enumerate(stream):
                    if abandon and k == 3:
                        stream.cancel()
                        tally.add("slow", "abandoned by the client", time.monotonic() - t0)
                        break
                    time.sleep(1.0)
                    if reply.finish_reason:
                        tally.add("slow", "served", time.monotonic() - t0)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and abandon:
                    continue
                outcome = "refused (server full)" if e.code() == FULL else "lost"
                tally.add("slow", outcome, time.monotonic() - t0, f"{e.code().name}: {e.details()}")
                time.sleep(0.5)


def idle_client(address: str, tally: Tally, t0: float, end: float, idle_timeout_s: float) -> None:
    """One call at a time that never sends its message: it must be cut (CANCELLED) near the idle deadline."""

    def nothing(release: threading.Event) -> Iterator[bytes]:
        release.wait()
        return
        yield

    with grpc.insecure_channel(address) as channel:
        method = channel.stream_unary(f"/{SERVICE_NAME}/GenerateUnary")
        while time.monotonic() < end:
            started, release = time.monotonic(), threading.Event()
            try:
                method(nothing(release), timeout=idle_timeout_s * 10)
                got = OK
            except grpc.RpcError as e:
                got = e.code()
            release.set()  # the channel's thread that waits for the messages this call never sends
            held = time.monotonic() - started
            if got == grpc.StatusCode.CANCELLED and held < idle_timeout_s * 3:
                tally.add("idle", "cut at the idle deadline", time.monotonic() - t0)
            elif got == FULL:
                tally.add("idle", "refused (server full)", time.monotonic() - t0)
            else:
                tally.add("idle", "wrong status", time.monotonic() - t0, f"{got.name} after {held:.1f} s")


def prober(address: str, tally: Tally, t0: float, end: float, probes: list[tuple[float, float]]) -> None:
    with MoeflowClient(address, timeout=2) as c:
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                ok = c.health() == "SERVING"
                c.stats()
            except grpc.RpcError as e:
                ok = False
                tally.add("probe", "failed", started - t0, f"{e.code().name}: {e.details()}")
            else:
                tally.add("probe", "answered" if ok else "failed", started - t0)
            probes.append((started - t0, time.monotonic() - started))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- report -----------------------------------------------------------------------------------------------------


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over the second half of the run (after the warm-up), MiB per minute."""
    half = [(t, m) for t, m in samples if t >= samples[-1][0] / 2]
    if len(half) < 2:
        return 0.0
    n, st, sm = len(half), sum(t for t, _ in half), sum(m for _, m in half)
    stt, stm = sum(t * t for t, _ in half), sum(t * m for t, m in half)
    denom = n * stt - st * st
    return 60 * (n * stm - st * sm) / denom if denom else 0.0


def plot(result: dict, tally: Tally, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    ax = axes[0]
    ts, mib = zip(*result["rss_mib"]) if result["rss_mib"] else ((), ())
    ax.plot(ts, mib, "-", color="#1f77b4")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(0, max(mib, default=1) * 1.2)
    ax.set_title(f"server memory (second half: {result['rss_slope_mib_per_min']:+.2f} MiB/min)")
    ax = axes[1]
    for (kind, outcome), color in zip(sorted({(k, o) for _, k, o in tally.events}), plt.cm.tab20.colors):
        times = sorted(t for t, k, o in tally.events if (k, o) == (kind, outcome))
        ax.step(times, range(1, len(times) + 1), where="post", label=f"{kind}: {outcome}", color=color)
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls (cumulative)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"outcomes; lost {result['lost']}, wrong status {result['wrong_status']}")
    cfg, hw = result["config"], result["hardware"]
    fig.suptitle(
        f"moeflow serve soak on loopback ({result['model']}), {cfg['duration']:g} s: {cfg['good']} good, "
        f"{cfg['bad']} bad, {cfg['slow']} slow, {cfg['idle']} idle clients, batch <= {cfg['max_batch_size']}, "
        f"queue <= {cfg['max_queue']}, idle deadline {cfg['idle_timeout_s']:g} s; {hw['cpu']} x{hw['cores']}, "
        f"{hw['date']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped default model)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: 600)")
    parser.add_argument("--good", type=int, default=4, help="clients sending valid requests (checked)")
    parser.add_argument("--bad", type=int, default=2, help="clients sending requests that must be refused")
    parser.add_argument("--slow", type=int, default=2, help="clients reading one message a second, or leaving")
    parser.add_argument("--idle", type=int, default=4, help="clients holding calls that never send their message")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=6)
    parser.add_argument("--idle-timeout-s", type=float, default=2.0)
    parser.add_argument("--expert-budget", default="50%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / BENCH)
    args = parser.parse_args()

    prompts = heldout_prompts(16, args.seed, min_chars=40, max_chars=160)
    lengths = [8 + (7 * i) % 17 for i in range(len(prompts))]
    import moeflow

    with moeflow.load(str(args.model) if args.model else None, expert_budget="all", store="ram") as engine:
        work = [(p, n, engine.generate(p, max_new_tokens=n).token_ids) for p, n in zip(prompts, lengths)]
    server_args = ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
                   "--idle-timeout-s", str(args.idle_timeout_s), "--expert-budget", args.expert_budget]  # fmt: skip
    if args.model is not None:
        server_args += ["--model", str(args.model)]
    server = ServerProcess(server_args)
    tally, probes, rss = Tally(), [], []
    t0 = time.monotonic()
    end = t0 + args.duration
    threads = (
        [threading.Thread(target=good_client, args=(server.address, work[i:] + work[:i], tally, t0, end))
         for i in range(args.good)]
        + [threading.Thread(target=bad_client, args=(server.address, tally, t0, end)) for _ in range(args.bad)]
        + [threading.Thread(target=slow_client, args=(server.address, prompts[i], tally, t0, end))
           for i in range(args.slow)]
        + [threading.Thread(target=idle_client, args=(server.address, tally, t0, end, args.idle_timeout_s))
           for _ in range(args.idle)]
        + [threading.Thread(target=prober, args=(server.address, tally, t0, end, probes))]
    )  # fmt: skip
    for t in threads:
        t.daemon = True
        t.start()
    while time.monotonic() < end:
        rss.append((time.monotonic() - t0, rss_mib(server.proc.pid)))
        print(
            f"\r{rss[-1][0]:6.0f} s  rss {rss[-1][1]:7.1f} MiB  calls {sum(tally.counts.values())}", end="", flush=True
        )
        time.sleep(2.0)
    for t in threads:
        t.join(timeout=120)
    stuck = sum(t.is_alive() for t in threads)
    status = server.stop()
    counts = {f"{k}: {o}": n for (k, o), n in sorted(tally.counts.items())}
    lost = sum(n for (k, o), n in tally.counts.items() if o in ("lost", "wrong tokens"))
    wrong_status = sum(n for (k, o), n in tally.counts.items() if o == "wrong status")
    probe_failures = tally.counts[("probe", "failed")] + sum(1 for _, s in probes if s > 2.0)
    result = {
        "bench": BENCH,
        "model": str(args.model or "moeflow/default_model"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hardware": machine(),
        "counts": counts,
        "served": sum(n for (k, o), n in tally.counts.items() if o == "served"),
        "refused_right_status": sum(
            n for (k, o), n in tally.counts.items() if o in ("refused, right status", "cut at the idle deadline")
        ),
        "refused_server_full": sum(n for (k, o), n in tally.counts.items() if o == "refused (server full)"),
        "abandoned_by_clients": tally.counts[("slow", "abandoned by the client")],
        "lost": lost,
        "wrong_status": wrong_status,
        "probe_failures": probe_failures,
        "probe_latency_max_s": max((s for _, s in probes), default=0.0),
        "clients_stuck_at_the_end": stuck,
        "server_exit_status": status,
        "rss_mib": rss,
        "rss_first_mib": rss[0][1] if rss else None,
        "rss_last_mib": rss[-1][1] if rss else None,
        "rss_max_mib": max((m for _, m in rss), default=None),
        "rss_slope_mib_per_min": slope_mib_per_min(rss) if rss else 0.0,
        "examples": {f"{k}: {o}": e for (k, o), e in tally.examples.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{BENCH}.json").write_text(json.dumps(result, indent=1))
    plot(result, tally, args.out / f"{BENCH}.png")
    print()
    for name, n in counts.items():
        print(f"{name:45s} {n:7d}")
    print(
        f"served {result['served']}, refused with the right status {result['refused_right_status']}, refused while "
        f"full {result['refused_server_full']}, lost {lost}, wrong status {wrong_status}, probe failures "
        f"{probe_failures}; RSS {result['rss_first_mib']:.0f} -> {result['rss_last_mib']:.0f} MiB (max "
        f"{result['rss_max_mib']:.0f}), second half {result['rss_slope_mib_per_min']:+.2f} MiB/min"
    )
    for name, example in result["examples"].items():
        print(f"  e.g. {name}: {example}")
    return 1 if lost or wrong_status or probe_failures or stuck or status not in (0, 1) else 0


if __name__ == "__main__":
    sys.exit(main())
