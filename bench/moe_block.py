"""MoE block forward (router + experts): moeflow's expert path vs transformers eager / grouped_mm / batched_mm.

One Mixtral-shaped sparse MoE block per expert count, random weights, fp32. For every token count
T, each provider runs the whole block forward with the block's own router (as the engine does), so
only the experts differ; providers are interleaved round-robin (warm-up first) so a noisy shared
machine slows them alike, and the median of the rounds is kept. moeflow's providers are
``kernels.experts_forward``, the entry the engine and training call: "moeflow exact" (exact=True
with the module's gate, what the offload engine runs: bit-identical to transformers' grouped_mm) and
"moeflow fast" (exact=False: ``kernels.fused_moe``, the formulation ``kernels.cpu.cpu_plan`` picks);
"moeflow <name>" is each CPU formulation x GEMM backend (``kernels.cpu.CPU_FORMULATIONS``), the
measurement behind ``kernels.cpu``'s built-in plan. Every output is checked against transformers'
grouped_mm (max |diff| / max |out| recorded). On a GPU the Triton kernels and transformers on the GPU
are added; without one the JSON says so.

    flock /tmp/moeflow-bench.lock nice -n 10 python bench/moe_block.py --out bench/results
    # the shipped default model's MoE layer, decode-sized batches (the engine's shapes):
    python bench/moe_block.py --experts 16 --tokens 1 2 4 8 16 --out bench/results/default_model

Shape legend: T tokens, D hidden, I expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real timings: CPU tensors take the torch path, not the interpreter

import moeflow.kernels as kernels  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from moeflow.kernels.cpu import CPU_FORMULATIONS, cpu_plan  # noqa: E402

from moeflow.options import add_options, options_from_args

BENCH = "moe_block"
EXACT = "moeflow exact"  # experts_forward(exact=True, gate=module._apply_gate): the offload engine's path
FAST = "moeflow fast"  # experts_forward(exact=False); "moeflow <name>" are kernels.cpu formulations


def _is_formulation(provider: str) -> bool:
    return provider.startswith("moeflow ") and provider not in (EXACT, FAST)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What to measure; every field is a command-line flag."""

    out: str = "bench/results"
    tokens: tuple[int, ...] = (1, 16, 128, 512)
    experts: tuple[int, ...] = (8, 64)
    rounds: int = 15
    warmup: int = 2
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    batched_mm_max_gib: float = 0.25  # batched_mm gathers a weight copy per pair; skip it above this
    pair_loop_max_pairs: int = 64  # time the per-pair formulation only up to this many (token, k) pairs
    gpu_tokens: tuple[int, ...] = (1, 16, 128, 512, 4096)
    gpu_only: bool = False  # on a GPU machine: only the GPU rows (written as moe_block_gpu.json/png)


@dataclass(frozen=True, kw_only=True)
class BlockShape:
    experts: int
    top_k: int
    hidden: int
    inter: int


# E=8: Mixtral's routing (top-2) at a quarter of its width; E=64: OLMoE's routing (top-8), half width;
# E=16: the shipped default model (moeflow/default_model).
SHAPES = {
    8: BlockShape(experts=8, top_k=2, hidden=1024, inter=2048),
    64: BlockShape(experts=64, top_k=8, hidden=1024, inter=512),
    16: BlockShape(experts=16, top_k=2, hidden=192, inter=192),
}


def build_block(shape: BlockShape, seed: int) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shape.hidden, intermediate_size=shape.inter, num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )  # fmt: skip
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config).eval().requires_grad_(False)
    torch.nn.init.normal_(block.gate.weight, std=shape.hidden**-0.5)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=shape.hidden**-0.5)
    torch.nn.init.normal_(block.experts.down_proj, std=shape.inter**-0.5)
    return block


def transformers_forward(block: torch.nn.Module, implementation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        block.experts.config._experts_implementation = implementation
        return block(x_TD[None])[0]

    return forward


def moeflow_forward(block: torch.nn.Module, experts_fn: Callable[..., torch.Tensor]):  # noqa: ANN201
    """The same block: its own router, then `experts_fn` on its experts, every expert resident (slot s
    holds expert s)."""
    experts = block.experts

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        _, weights_TK, ids_TK = block.gate(x_TD)
        return experts_fn(x_TD, experts.gate_up_proj, experts.down_proj, weights_TK, ids_TK)

    return forward


def kernels_forward(block: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The GPU rows' moeflow block: F.linear router logits, kernels.topk_softmax, then kernels.fused_moe."""
    k = block.gate.top_k

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = F.linear(x_TD, block.gate.weight)
        weights_TK, ids_TK = kernels.topk_softmax(logits_TE, k, renormalize=True)
        return kernels.fused_moe(x_TD, block.experts.gate_up_proj, block.experts.down_proj, weights_TK, ids_TK)

    return forward


def providers(block: torch.nn.Module, shape: BlockShape, T: int, s: Settings) -> dict[str, Callable]:
    out = {
        "transformers eager": transformers_forward(block, "eager"),
        "transformers grouped_mm": transformers_forward(block, "grouped_mm"),
    }
    gathered_gib = T * shape.top_k * 3 * shape.hidden * shape.inter * 4 / 2**30
    if gathered_gib <= s.batched_mm_max_gib:
        out["transformers batched_mm"] = transformers_forward(block, "batched_mm")
    out[EXACT] = moeflow_forward(block, partial(kernels.experts_forward, gate=block.experts._apply_gate))
    out[FAST] = moeflow_forward(block, partial(kernels.experts_forward, exact=False))
    for name, fn in CPU_FORMULATIONS.items():
        if name.startswith("pair_loop") and T * shape.top_k > s.pair_loop_max_pairs:
            continue
        out[f"moeflow {name}"] = moeflow_forward(block, fn)
    return out


def time_round_robin(fns: dict[str, Callable], x_TD: torch.Tensor, s: Settings) -> dict[str, list[float]]:
    """Warm up each, then `rounds` rounds calling every provider once, in a rotating order."""
    names = list(fns)
    with torch.inference_mode():
        for name in names:
            for _ in range(s.warmup):
                fns[name](x_TD)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(s.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name](x_TD)
                times[name].append(time.perf_counter() - t0)
    return times


def check_outputs(fns: dict[str, Callable], x_TD: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        want = fns["transformers grouped_mm"](x_TD)
        scale = want.abs().max().item()
        return {n: (fn(x_TD) - want).abs().max().item() / scale for n, fn in fns.items()}


# On the GPU, bf16 as served: the bench's two shapes, and Mixtral 8x7B's real block.
GPU_SHAPES = {
    "E=8 (D=1024, I=2048)": SHAPES[8],
    "E=64 (D=1024, I=512)": SHAPES[64],
    "Mixtral 8x7B (D=4096, I=14336)": BlockShape(experts=8, top_k=2, hidden=4096, inter=14336),
}
GPU_PROVIDERS = ("transformers grouped_mm (cuda)", "moeflow triton (cuda)")


def gpu_rows(s: Settings) -> list[dict] | str:
    """Triton vs transformers' grouped_mm on the GPU, or why that could not run.

    Each is timed as launched from Python (`do_bench`) and replayed from a CUDA graph
    (`do_bench_cudagraph`): the first is what an eager caller pays, the second the kernels alone.
    """
    if not torch.cuda.is_available():
        return "not run: no GPU on this machine (the Triton kernels are tested under TRITON_INTERPRET=1)"
    import triton.testing

    rows = []
    for shape_name, shape in GPU_SHAPES.items():
        block = build_block(shape, s.seed).to("cuda", torch.bfloat16)
        fns = dict(zip(GPU_PROVIDERS, (transformers_forward(block, "grouped_mm"), kernels_forward(block))))
        for T in s.gpu_tokens:
            x = torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16)
            flops = 2 * 3 * T * shape.top_k * shape.hidden * shape.inter
            with torch.inference_mode():
                want = fns[GPU_PROVIDERS[0]](x).float()
                for name, fn in fns.items():
                    got = fn(x).float()
                    ms = triton.testing.do_bench(lambda fn=fn, x=x: fn(x), rep=200)
                    graph_ms = triton.testing.do_bench_cudagraph(lambda fn=fn, x=x: fn(x), rep=200)
                    rows.append({"shape": shape_name, "E": shape.experts, "T": T, "provider": name, "dtype": "bfloat16",
                                 "median_ms": ms, "graph_ms": graph_ms, "graph_tflops": flops / graph_ms / 1e9,
                                 "rel_diff_vs_grouped_mm": float((got - want).norm() / want.norm())})  # fmt: skip
            print(f"GPU {shape_name} T={T:>5}: " + ", ".join(
                f"{r['provider']} {r['median_ms']:.3f} ms (graph {r['graph_ms']:.3f})" for r in rows[-2:]), flush=True)
        del block, fns
        torch.cuda.empty_cache()
    return rows


def plot_gpu(rows: list[dict], s: Settings, path: Path) -> None:
    """Speedup of the Triton path over transformers' grouped_mm per shape, eager launch and CUDA graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, (key, title) in zip(axes, (("median_ms", "launched from Python"), ("graph_ms", "CUDA graph replay"))):
        for shape_name in GPU_SHAPES:
            by = {(r["T"], r["provider"]): r[key] for r in rows if r["shape"] == shape_name}
            Ts = sorted({t for t, _ in by})
            ax.plot(Ts, [by[(t, GPU_PROVIDERS[0])] / by[(t, GPU_PROVIDERS[1])] for t in Ts], "-o", label=shape_name)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="tokens T", title=f"{title}, bf16")
        ax.set_xticks(list(s.gpu_tokens), [str(t) for t in s.gpu_tokens])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("transformers grouped_mm time / moeflow Triton time")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MoE block forward (router + experts) on {torch.cuda.get_device_name()}: >1 = moeflow faster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def hardware() -> dict[str, object]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "load_average": os.getloadavg(),
        "onednn": torch.backends.mkldnn.is_available(),
    }  # fmt: skip


def plot(rows: list[dict], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(s.experts), figsize=(6.5 * len(s.experts), 4.8), squeeze=False)
    for ax, E in zip(axes[0], s.experts):
        names = sorted({r["provider"] for r in rows if r["E"] == E},
                       key=lambda n: (not n.startswith("transformers"), _is_formulation(n), n))  # fmt: skip
        for name in names:
            pts = sorted((r["T"], r["median_ms"] / r["T"]) for r in rows if r["E"] == E and r["provider"] == name)
            style = ":." if _is_formulation(name) else "-o"
            width = 2.5 if name in (EXACT, FAST) else 1.2
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=width, label=name)
        sh = SHAPES[E]
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms per token (median)",
               title=f"E={E}, K={sh.top_k}, D={sh.hidden}, I={sh.inter}, fp32")  # fmt: skip
        ax.set_xticks(list(s.tokens), [str(t) for t in s.tokens])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    hw = hardware()
    fig.suptitle(f"MoE block forward on CPU: {hw['cpu']}, {hw['torch_threads']} threads (shared, noisy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(rows: list[dict], s: Settings) -> list[dict]:
    out = []
    for E in s.experts:
        for T in s.tokens:
            here = [r for r in rows if r["E"] == E and r["T"] == T]
            by = {r["provider"]: r["median_ms"] for r in here}
            by_min = {r["provider"]: r["min_ms"] for r in here}
            diff = {r["provider"]: r["max_rel_diff_vs_grouped_mm"] for r in here}
            hf = {n: v for n, v in by.items() if n.startswith("transformers")}
            best_hf = min(hf, key=hf.get)
            best_hf_min = min(v for n, v in by_min.items() if n in hf)
            forms = {n: v for n, v in by.items() if _is_formulation(n)}
            row = {"E": E, "T": T, "eager_ms": by["transformers eager"], "grouped_mm_ms": by["transformers grouped_mm"],
                   "best_transformers": best_hf,
                   "fastest_moeflow_formulation": min(forms, key=forms.get).removeprefix("moeflow "),
                   "moeflow_plan": cpu_plan(T, SHAPES[E].top_k, SHAPES[E].hidden, SHAPES[E].inter)}  # fmt: skip
            for key, name in (("exact", EXACT), ("fast", FAST)):
                row |= {
                    f"{key}_ms": by[name],
                    f"{key}_speedup_vs_grouped_mm": by["transformers grouped_mm"] / by[name],
                    f"{key}_speedup_vs_best_transformers": hf[best_hf] / by[name],
                    # the same from each provider's fastest round: what a noisy machine disturbs least
                    f"{key}_speedup_vs_best_transformers_min": best_hf_min / by_min[name],
                    f"{key}_max_rel_diff_vs_grouped_mm": diff[name],
                }
            out.append(row)
    return out


def print_table(table: list[dict]) -> None:
    head = (f"{'E':>3} {'T':>4} | {'eager ms':>9} {'grouped ms':>10} {'exact ms':>9} {'fast ms':>8} | "
            f"{'exact x best HF':>15} {'(min)':>6} {'diff':>7} | {'fast x best HF':>14} {'(min)':>6} {'diff':>7} | "
            "plan / fastest formulation")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in table:
        print(f"{r['E']:>3} {r['T']:>4} | {r['eager_ms']:>9.2f} {r['grouped_mm_ms']:>10.2f} {r['exact_ms']:>9.2f} "
              f"{r['fast_ms']:>8.2f} | {r['exact_speedup_vs_best_transformers']:>15.2f} "
              f"{r['exact_speedup_vs_best_transformers_min']:>6.2f} {r['exact_max_rel_diff_vs_grouped_mm']:>7.0e} | "
              f"{r['fast_speedup_vs_best_transformers']:>14.2f} {r['fast_speedup_vs_best_transformers_min']:>6.2f} "
              f"{r['fast_max_rel_diff_vs_grouped_mm']:>7.0e} | "
              f"{r['moeflow_plan']} / {r['fastest_moeflow_formulation']}")  # fmt: skip


def run(s: Settings) -> dict:
    started = hardware()
    rows = []
    for E in s.experts:
        shape = SHAPES[E]
        block = build_block(shape, s.seed)
        for T in s.tokens:
            x_TD = torch.randn(T, shape.hidden, generator=torch.Generator().manual_seed(s.seed + T))
            fns = providers(block, shape, T, s)
            errors = check_outputs(fns, x_TD)
            t0 = time.perf_counter()
            times = time_round_robin(fns, x_TD, s)
            for name, ts in times.items():
                rows.append({"E": E, "T": T, "provider": name, "median_ms": 1e3 * statistics.median(ts),
                             "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
                             "max_rel_diff_vs_grouped_mm": errors[name]})  # fmt: skip
            ms = {n: 1e3 * statistics.median(times[n]) for n in (EXACT, FAST, "transformers grouped_mm")}
            print(f"E={E:>3} T={T:>4}: {len(fns)} providers x {s.rounds} rounds in {time.perf_counter() - t0:.1f}s; "
                  + ", ".join(f"{n} {v:.2f} ms" for n, v in ms.items()), flush=True)  # fmt: skip
        del block
    return {"bench": BENCH, "settings": dataclasses.asdict(s), "shapes": {E: dataclasses.asdict(SHAPES[E])
            for E in s.experts}, "hardware": started, "load_average_after": os.getloadavg(), "dtype": "float32",
            "cpu_rows": rows, "summary": summary(rows, s), "gpu": gpu_rows(s)}  # fmt: skip


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, Settings)
    return options_from_args(Settings, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    s = parse(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.gpu_only:
        rows = gpu_rows(s)
        if isinstance(rows, str):
            raise SystemExit(f"--gpu-only: {rows}")
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"bench": BENCH, "settings": dataclasses.asdict(s), "hardware": hardware(),
                  "gpu_name": torch.cuda.get_device_name(), "gpu_shapes": {n: dataclasses.asdict(sh)
                  for n, sh in GPU_SHAPES.items()}, "gpu": rows}  # fmt: skip
        (out / f"{BENCH}_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_gpu(rows, s, out / f"{BENCH}_gpu.png")
        print(f"wrote {out / (BENCH + '_gpu.json')} and {out / (BENCH + '_gpu.png')}")
        return
    bad = [E for E in s.experts if E not in SHAPES]
    if bad:
        raise SystemExit(f"--experts: no block shape for {bad}; known: {sorted(SHAPES)}")
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(s)
    (out / f"{BENCH}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result["cpu_rows"], s, out / f"{BENCH}.png")
    print()
    print_table(result["summary"])
    gpu = result["gpu"]
    print(f"\nGPU: {gpu}" if isinstance(gpu, str) else f"\nGPU rows: {len(gpu)} (in the JSON)")
    print(f"wrote {out / (BENCH + '.json')} and {out / (BENCH + '.png')}")


if __name__ == "__main__":
    main()
