"""Measure which CPU formulation of the fused MoE is fastest on this machine, and store it as data.

    python -m moeflow.kernels.tune_cpu                 # the default grid, 7 interleaved rounds
    python -m moeflow.kernels.tune_cpu --threads 8     # for torch running with 8 threads

For every expert size (hidden x inter), routing (top-2 of 8 experts as Mixtral, top-8 of 64 as
OLMoE) and token count of the grid, each formulation of ``kernels.cpu.CPU_FORMULATIONS`` that
applies runs the same fp32 call in interleaved rounds; the median decides. Measure on the machine in
the state it will serve in: an idle machine favours oneDNN for one-row GEMMs, which stall when
another process holds a core (see ``kernels.cpu``). The points go to
``kernels/configs/cpu_<cpu model>_<threads>t.json``, which ``kernels.cpu.cpu_plan`` then follows on
this kind of machine instead of the built-in crossovers (measured on another machine).

Shape legend: T tokens, D hidden, I expert hidden, S slots, K experts per token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from moeflow.kernels import backend
from moeflow.kernels.cpu import CPU_FORMULATIONS, machine_key, measured_path, measured_points

SIZES = ((192, 192), (256, 256), (384, 384), (512, 512), (512, 1024), (1024, 2048))  # (D, I)
TOKENS = (1, 2, 4, 8, 16, 64, 256, 512)
ROUTINGS = ((2, 8), (8, 64))  # (top-k, experts)
PAIR_LOOP_MAX_PAIRS = 64  # one GEMM pair per (token, k): hopeless beyond this, and slow to time


def applicable(name: str, gate_up_S2ID: torch.Tensor, down_SDI: torch.Tensor, pairs: int) -> bool:
    if name.startswith("pair_loop"):
        return pairs <= PAIR_LOOP_MAX_PAIRS
    if name == "grouped_mm":
        return backend.grouped_mm_fits(gate_up_S2ID, down_SDI)
    return True


def measure(
    sizes: tuple[tuple[int, int], ...] = SIZES,
    tokens: tuple[int, ...] = TOKENS,
    routings: tuple[tuple[int, int], ...] = ROUTINGS,
    *,
    rounds: int = 7,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """One point per (size, routing, T): every applicable formulation's median ms, and the fastest."""
    from tqdm import tqdm

    points = []
    gen = torch.Generator().manual_seed(seed)
    total = len(sizes) * len(routings) * len(tokens)
    with torch.inference_mode(), tqdm(total=total, desc="tune cpu", disable=not progress) as bar:
        for (D, I), (top_k, slots) in itertools.product(sizes, routings):
            gate_up = torch.randn(slots, 2 * I, D, generator=gen) * D**-0.5
            down = torch.randn(slots, D, I, generator=gen) * I**-0.5
            for T in tokens:
                hidden = torch.randn(T, D, generator=gen)
                weights = torch.rand(T, top_k, generator=gen).softmax(-1)
                ids = torch.stack([torch.randperm(slots, generator=gen)[:top_k] for _ in range(T)])
                args = (hidden, gate_up, down, weights, ids)
                fns = {n: f for n, f in CPU_FORMULATIONS.items() if applicable(n, gate_up, down, T * top_k)}
                times: dict[str, list[float]] = {n: [] for n in fns}
                for fn in fns.values():  # warm-up: first calls allocate and pick kernels
                    fn(*args)
                for _ in range(rounds):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn(*args)
                        times[name].append(time.perf_counter() - t0)
                ms = {n: 1e3 * statistics.median(ts) for n, ts in times.items()}
                points.append({"D": D, "I": I, "di": D * I, "K": top_k, "S": slots, "T": T, "pairs": T * top_k,
                               "ms": ms, "winner": min(ms, key=ms.get)})  # fmt: skip
                bar.update(1)
    return points


def write(points: list[dict], rounds: int, path: Path | None = None) -> Path:
    key = machine_key()
    path = path or measured_path(key)
    path.write_text(json.dumps({
        "note": "measured by python -m moeflow.kernels.tune_cpu; kernels.cpu.cpu_plan follows it on this machine",
        "machine": {"key": key, "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "rounds": rounds},
        "points": points,
    }, indent=1) + "\n")  # fmt: skip
    measured_points.cache_clear()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads to measure with (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    points = measure(rounds=args.rounds)
    path = write(points, args.rounds)
    for p in points:
        print(f"D*I={p['D']}x{p['I']:<5} K={p['K']} T={p['T']:<4} {p['winner']:<16} "
              + "  ".join(f"{n} {v:.3f}" for n, v in sorted(p["ms"].items())))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
