"""MoE layer training step with expert parallelism over two ranks: no overlap vs overlap vs DeepSpeed-MoE.

Two links:
  limited   each rank in its own network namespace, joined by a veth pair whose both ends are
            rate-limited with `tc qdisc ... tbf` (a real slow link; traffic only between our namespaces)
  loopback  both ranks in this namespace over 127.0.0.1

The tbf bucket (--burst, default 128 KiB, 1 ms at 1 Gbit/s) must hold a whole 64 KiB GSO segment.
With a 32 kbit bucket (`burst 32kbit`, tried first) tbf re-segments every segment into 1500-byte packets in software:
measured here, one 4 MiB-per-rank all-to-all then cost each rank ~53 ms of CPU (vs ~4 ms with the
128 KiB bucket) on the two cores the ranks compute on, an artifact of both "nodes" sharing one CPU
that a NIC with segmentation offload does not have. The rate limit is the same either way.

Contenders, same sizes, same top-2 SwiGLU experts, same step (forward, backward, gradient
averaging of the router, SGD):
  no_overlap  moeflow MoELayer, d = 1 (all-to-all, then experts, then all-to-all), grads reduced after
  overlap     moeflow MoELayer, d chosen by online profiling (or --chunks), bucketed grad reduction
  deepspeed   deepspeed.moe.layer.MoE (top-2 gating, capacity factor 1)

Rounds interleave the contenders (the machine is shared; a round's time is the max over ranks;
step_s is the median of rounds, step_s_min the least disturbed round).
One traced step per moeflow contender gives the breakdown (expert compute, main thread waiting on
an all-to-all, the rest); DeepSpeed's blocking all-to-alls are timed by wrapping deepspeed.comm.
Writes JSON + PNG to --out; namespaces are removed on exit, error, SIGINT or SIGTERM (and stale
ones from an interrupted run are removed at start). Needs root for the limited link.

    nice -n 10 .venv/bin/python bench/train_overlap.py            # full run
    nice -n 10 .venv/bin/python bench/train_overlap.py --quick --json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from moeflow.options import add_options, options_from_args

BENCH = "train_overlap"
NAMESPACES = ("moeflow-bench0", "moeflow-bench1")
VETHS = ("mfbench0", "mfbench1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")  # private, exist only on the veth inside our namespaces
CONTENDERS = ("no_overlap", "overlap", "deepspeed")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    tokens: int = 2048  # per rank, per step
    hidden: int = 512
    expert_hidden: int = 768
    experts: int = 8
    top_k: int = 2
    chunks: int = 0  # force d for the overlap contender; 0: online profiling
    max_chunks: int = 8
    warmup: int = 2
    rounds: int = 7
    steps_per_round: int = 3
    rate: str = "1gbit"
    burst: str = "128kb"  # tbf bucket: must hold a 64 KiB GSO segment (see the module docstring)
    links: str = "limited,loopback"
    out: str = "bench/results"
    timeout_s: int = 600
    quick: bool = False  # reduced sizes and rounds: 50-93 s on the 2-core EPYC (load 4-6), mostly rank start-up
    json: bool = False  # print {"links": [...]} on stdout

    def resolved(self) -> BenchConfig:
        if not self.quick:
            return self
        return dataclasses.replace(self, tokens=1024, warmup=2, rounds=3, steps_per_round=2)


def _parse(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, BenchConfig)
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--master", default="127.0.0.1", help=argparse.SUPPRESS)
    worker.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--ifname", default="lo", help=argparse.SUPPRESS)
    worker.add_argument("--link", default="loopback", help=argparse.SUPPRESS)
    worker.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = options_from_args(BenchConfig, args)
    return config, args


def _log(message: str) -> None:
    print(f"[{BENCH}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- worker


def _worker(config: BenchConfig, args: argparse.Namespace) -> None:
    os.environ.update(
        GLOO_SOCKET_IFNAME=args.ifname,
        RANK=str(args.rank),
        LOCAL_RANK=str(args.rank),
        WORLD_SIZE="2",
        MASTER_ADDR=args.master,
        MASTER_PORT=str(args.port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank, world_size=2)
    import deepspeed
    import deepspeed.comm as ds_comm
    from moeflow.training.deepspeed_compat import deepspeed_moe_baseline, prepare_extension_dir
    from moeflow.training.grad_buckets import BucketConfig, GradBucketReducer
    from moeflow.training.moe_layer import MoELayer, MoELayerConfig
    from moeflow.training.routing import TopKSoftmax
    from moeflow.training.timeline import Timeline

    prepare_extension_dir()
    deepspeed.init_distributed(dist_backend="gloo")
    grad_group = dist.new_group([0, 1])  # router-gradient averaging off the all-to-all group's queue
    say = _log if args.rank == 0 else (lambda message: None)

    layer_config = MoELayerConfig(
        hidden_size=config.hidden,
        expert_hidden_size=config.expert_hidden,
        num_experts=config.experts,
        routing=TopKSoftmax(k=config.top_k, aux_loss_coef=0.01),
        max_chunks=config.max_chunks,
        expert_backend="torch",
    )
    torch.manual_seed(1000 + args.rank)
    x_TD = torch.randn(config.tokens, config.hidden).requires_grad_(True)  # as inside a model
    grad_TD = torch.randn(config.tokens, config.hidden) / config.tokens

    ds_a2a_seconds = [0.0]
    plain_all_to_all_single = ds_comm.all_to_all_single

    def timed_all_to_all_single(*a, **kw):  # DeepSpeed-MoE's all-to-alls are blocking
        started = time.perf_counter()
        result = plain_all_to_all_single(*a, **kw)
        ds_a2a_seconds[0] += time.perf_counter() - started
        return result

    ds_comm.all_to_all_single = timed_all_to_all_single

    def moeflow(num_chunks: int | None, overlap: bool):
        torch.manual_seed(0)
        layer = MoELayer(dataclasses.replace(layer_config, num_chunks=num_chunks), group=dist.group.WORLD)
        reducer = GradBucketReducer(
            [layer.gate.weight],
            group=grad_group,
            expert_params=layer.expert_parameters(),
            config=BucketConfig(overlap=overlap),
        )
        return layer, reducer, (lambda: _moeflow_forward(layer, x_TD))

    def _moeflow_forward(layer, x):
        out = layer(x)
        return out, layer.aux_loss

    torch.manual_seed(0)
    ds_moe = deepspeed_moe_baseline(layer_config, ep_size=2, k=config.top_k, capacity_factor=1.0)
    ds_moe.set_deepspeed_parallelism()
    ds_experts = [p for p in ds_moe.parameters() if getattr(p, "allreduce", True) is False]
    ds_reducer = GradBucketReducer(
        [p for p in ds_moe.parameters() if getattr(p, "allreduce", True) is not False],
        group=grad_group,
        expert_params=ds_experts,
        config=BucketConfig(overlap=False),
    )

    def _ds_forward():
        out, aux, _ = ds_moe(x_TD)
        return out, aux

    contenders = {
        "no_overlap": moeflow(1, overlap=False),
        "overlap": moeflow(config.chunks or None, overlap=True),
        "deepspeed": (ds_moe, ds_reducer, _ds_forward),
    }
    optimizers = {name: torch.optim.SGD(c[0].parameters(), lr=1e-3) for name, c in contenders.items()}

    def step(name: str) -> None:
        module, reducer, forward = contenders[name]
        out, aux = forward()
        ((out * grad_TD).sum() + aux).backward()
        reducer.finish()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    def timed_steps(name: str, count: int) -> float:
        dist.barrier()
        started = time.perf_counter()
        for _ in range(count):
            step(name)
        elapsed = torch.tensor([(time.perf_counter() - started) / count], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    say(f"{args.link}: warm-up (the overlap contender profiles d on its first step)")
    for name in CONTENDERS:
        timed_steps(name, config.warmup)
    layer = contenders["overlap"][0]
    profile = layer.split_profile
    say(f"{args.link}: d = {layer.num_chunks}" + (" (forced)" if config.chunks else " (profiled)"))

    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for round_index in range(config.rounds):
        order = CONTENDERS[round_index % 3 :] + CONTENDERS[: round_index % 3]
        for name in order:
            samples[name].append(timed_steps(name, config.steps_per_round))
        say(
            f"{args.link}: round {round_index + 1}/{config.rounds}  "
            + "  ".join(f"{name} {samples[name][-1]:.3f}s" for name in CONTENDERS)
        )

    breakdown, traces = {}, {}
    for name in ("no_overlap", "overlap"):
        module = contenders[name][0]
        module.timeline = Timeline()
        dist.barrier()
        started = time.perf_counter()
        step(name)
        total = time.perf_counter() - started
        spans = module.timeline.spans()
        offset = started - module.timeline.origin  # spans count from the timeline's origin
        module.timeline = None
        compute = sum(s.end - s.start for s in spans if s.lane == "compute")
        waiting = sum(s.end - s.start for s in spans if s.lane == "wait")
        breakdown[name] = {
            "step_s": total,
            "expert_compute_s": compute,
            "exposed_comm_s": waiting,
            "other_s": max(total - compute - waiting, 0.0),
        }
        traces[name] = [[s.lane, s.label, s.start - offset, s.end - offset] for s in spans]
    ds_a2a_seconds[0] = 0.0
    dist.barrier()
    started = time.perf_counter()
    step("deepspeed")
    total = time.perf_counter() - started
    breakdown["deepspeed"] = {
        "step_s": total,
        "expert_compute_s": None,  # not separable from DeepSpeed's other work without its internals
        "exposed_comm_s": ds_a2a_seconds[0],
        "other_s": max(total - ds_a2a_seconds[0], 0.0),
    }

    if args.rank == 0:
        result = {
            "link": args.link,
            "step_s": {name: statistics.median(values) for name, values in samples.items()},
            "step_s_min": {name: min(values) for name, values in samples.items()},  # least disturbed round
            "samples_s": samples,
            "d": layer.num_chunks,
            "d_forced": bool(config.chunks),
            "profile": None
            if profile is None
            else {
                "num_bytes": profile.num_bytes,
                "all_to_all": asdict(profile.all_to_all),
                "expert_forward": asdict(profile.expert_forward),
                "expert_backward": asdict(profile.expert_backward),
                "predicted_step_s": profile.predicted_step_s,
            },
            "breakdown_rank0": breakdown,
            "trace_rank0": traces,
        }
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------- orchestrator


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def _remove_limited_link() -> None:
    for namespace in NAMESPACES:
        _ip("netns", "del", namespace, check=False)  # deletes the veth end inside it, and its peer
    _ip("link", "del", VETHS[0], check=False)  # in case an interrupted run left it unmoved


@contextmanager
def _limited_link(rate: str, burst: str) -> Iterator[None]:
    _remove_limited_link()  # stale ones from an interrupted run
    try:
        for namespace in NAMESPACES:
            _ip("netns", "add", namespace)
        _ip("link", "add", VETHS[0], "type", "veth", "peer", "name", VETHS[1])
        for namespace, veth, address in zip(NAMESPACES, VETHS, ADDRESSES):
            _ip("link", "set", veth, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", namespace, "link", "set", veth, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            tbf = ["tbf", "rate", rate, "burst", burst, "latency", "400ms"]
            subprocess.run(
                ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", veth, "root", *tbf],
                check=True,
                capture_output=True,
            )
        yield
    finally:
        _remove_limited_link()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_link(link: str, config: BenchConfig, argv_config: list[str], folder: Path) -> dict:
    result_path = folder / f"{link}.json"
    if link == "limited":
        master, port = ADDRESSES[0], 29611
        prefixes = [["ip", "netns", "exec", namespace] for namespace in NAMESPACES]
        ifnames = VETHS
    else:
        master, port = "127.0.0.1", _free_port()
        prefixes, ifnames = [[], []], ("lo", "lo")
    processes = []
    try:
        for rank in range(2):
            command = [
                *prefixes[rank],
                sys.executable,
                str(Path(__file__).resolve()),
                *argv_config,
                "--worker",
                "--rank",
                str(rank),
                "--master",
                master,
                "--port",
                str(port),
                "--ifname",
                ifnames[rank],
                "--link",
                link,
                "--result",
                str(result_path),
            ]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + config.timeout_s
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{link}: ranks did not finish in {config.timeout_s} s")
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in processes]
        if any(code != 0 for code in codes):
            raise RuntimeError(f"{link}: a rank failed (exit codes {codes}); see its messages above")
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads(result_path.read_text())


def _plot(results: list[dict], path: Path, config: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, gantt) = plt.subplots(2, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [1.1, 1]})
    colors = {"expert_compute_s": "#4c72b0", "exposed_comm_s": "#dd8452", "other_s": "#8c8c8c"}
    labels = {
        "expert_compute_s": "expert compute (main thread)",
        "exposed_comm_s": "waiting on all-to-all (exposed comm)",
        "other_s": "everything else",
    }
    xticks, xlabels = [], []
    for i, link in enumerate(results):
        for j, name in enumerate(CONTENDERS):
            x = i * 4 + j
            part = link["breakdown_rank0"][name]
            scale = link["step_s"][name] / part["step_s"]  # traced step scaled to the median step
            bottom = 0.0
            for key in ("expert_compute_s", "exposed_comm_s", "other_s"):
                value = (part[key] or 0.0) * scale
                bars.bar(x, value, bottom=bottom, color=colors[key], label=labels[key] if x == 0 else None)
                bottom += value
            bars.text(x, bottom, f"{link['step_s'][name]:.2f}s", ha="center", va="bottom", fontsize=8)
            xticks.append(x)
            suffix = f"\nd={link['d']}" if name == "overlap" else ""
            xlabels.append(f"{link['link']}\n{name}{suffix}")
    bars.set_xticks(xticks, xlabels, fontsize=8)
    bars.set_ylabel("seconds per step (median)")
    bars.set_title(
        f"MoE layer step, 2 ranks: T={config.tokens}/rank, D={config.hidden}, I={config.expert_hidden}, "
        f"E={config.experts}, top-{config.top_k} (DeepSpeed: expert compute inside 'everything else')",
        fontsize=9,
    )
    bars.legend(fontsize=8, loc="upper right")

    traced = next((r for r in results if r["link"] == "limited"), results[0])
    lane_y = {"compute": 0, "wait": 1, "comm": 2}
    lane_color = {"compute": "#4c72b0", "wait": "#dd8452", "comm": "#55a868"}
    yticks, ylabels = [], []
    for row, name in enumerate(("no_overlap", "overlap")):
        base = row * 4
        for lane, offset in lane_y.items():
            spans = [(s[2], s[3] - s[2]) for s in traced["trace_rank0"][name] if s[0] == lane]
            gantt.broken_barh(spans, (base + offset - 0.4, 0.8), color=lane_color[lane])
            yticks.append(base + offset)
            ylabels.append(f"{name}: {'all-to-all in flight' if lane == 'comm' else lane}")
    gantt.set_yticks(yticks, ylabels, fontsize=8)
    gantt.set_xlabel("seconds into one traced step (rank 0)")
    gantt.set_title(f"{traced['link']} link: one step's timeline (overlap: d={traced['d']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(results: list[dict]) -> str:
    lines = [f"{'link':<10}{'':<7}{'no_overlap':>12}{'overlap':>10}{'deepspeed':>11}{'d':>4}{'speedup':>9}{'vs DS':>8}"]
    for r in results:
        for stat, s in (("median", r["step_s"]), ("min", r["step_s_min"])):
            lines.append(
                f"{r['link']:<10}{stat:<7}{s['no_overlap']:>11.3f}s{s['overlap']:>9.3f}s{s['deepspeed']:>10.3f}s"
                f"{r['d']:>4}{s['no_overlap'] / s['overlap']:>8.2f}x{s['deepspeed'] / s['overlap']:>7.2f}x"
            )
    return "\n".join(lines)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _orchestrate(config: BenchConfig, argv: list[str]) -> None:
    resolved = config.resolved()
    links = [link.strip() for link in resolved.links.split(",") if link.strip()]
    unknown = set(links) - {"limited", "loopback"}
    if unknown:
        raise SystemExit(f"unknown links {sorted(unknown)}; use limited and/or loopback")
    if "limited" in links and os.geteuid() != 0:
        raise SystemExit("the limited link needs root (network namespaces); run as root or --links loopback")
    out = Path(resolved.out)
    out.mkdir(parents=True, exist_ok=True)
    worker_argv = [a for a in argv if a not in ("--json",)]
    results = []
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}-") as folder:
        for link in links:
            _log(f"{link}: starting two ranks" + (f" over a {resolved.rate} tbf veth" if link == "limited" else ""))
            if link == "limited":
                with _limited_link(resolved.rate, resolved.burst):
                    results.append(_run_link(link, resolved, worker_argv, Path(folder)))
            else:
                results.append(_run_link(link, resolved, worker_argv, Path(folder)))
    report = {
        "bench": BENCH,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": _hardware(),
        "config": asdict(resolved),
        "link_setup": {
            "limited": f"veth (mtu 1500) + tc tbf rate {resolved.rate} burst {resolved.burst} latency 400ms",
            "loopback": "127.0.0.1",
        },
        "links": results,
    }
    suffix = "_quick" if resolved.quick else ""
    (out / f"{BENCH}{suffix}.json").write_text(json.dumps(report, indent=1))
    _plot(results, out / f"{BENCH}{suffix}.png", resolved)
    _log("\n" + _summary(results))
    _log(f"wrote {out / f'{BENCH}{suffix}.json'} and .png")
    if resolved.json:
        print(json.dumps({"links": [{"link": r["link"], "step_s": r["step_s"], "d": r["d"]} for r in results]}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config, args = _parse(argv)
    if args.worker:
        _worker(config.resolved(), args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup below
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        _orchestrate(config, argv)
    except KeyboardInterrupt:
        _log("interrupted; namespaces removed")
        sys.exit(130)


if __name__ == "__main__":
    main()
