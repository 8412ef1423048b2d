"""Decode with the experts off the GPU: moeflow's slot pool vs accelerate's CPU offload vs all resident.

The Mixtral-shaped random-weight checkpoint of ``bench/offload_decode.py`` (8 layers x 8 experts,
1.69 GiB of fp32 experts), greedy decode of 64 tokens, one process, one GPU, side by side:

- transformers with everything on the GPU (the reference tokens and the speed ceiling);
- moeflow ``--device cuda`` with the experts in pinned host RAM (``--store ram``) at budgets all,
  50% and 25%, and from disk (O_DIRECT, ``--store disk``) at 25%;
- accelerate's offload (``device_map="auto"`` with the GPU capped at the dense weights plus 25% of
  the experts; what does not fit stays in host RAM and is copied in at every forward).

Every contender's tokens must equal the resident run's. Reports decode tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``), and moeflow's hit rate and bytes moved; writes JSON + PNG.

    python bench/offload_gpu.py --out bench/results
    python bench/offload_gpu.py --device cpu --layers 2 --hidden 256 --inter 512   # a dry run without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from offload_decode import Shape, build_checkpoint  # noqa: E402

import moeflow  # noqa: E402

BENCH = "offload_gpu"


def greedy(model: torch.nn.Module, prompt: list[int], n: int, device: str) -> tuple[list[int], float]:
    """transformers' greedy decode with a KV cache; returns tokens and decode seconds (after the prefill)."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt], device=device), past_key_values=past, use_cache=True).logits
        out = [int(logits[0, -1].argmax())]
        _sync(device)
        t0 = time.perf_counter()
        while len(out) < n:
            ids = torch.tensor([[out[-1]]], device=device)
            out.append(int(model(input_ids=ids, past_key_values=past, use_cache=True).logits[0, -1].argmax()))
        _sync(device)
    return out, time.perf_counter() - t0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def run_transformers(ckpt: Path, prompt: list[int], n: int, device: str, shape: Shape, budget: float | None) -> dict:
    from transformers import AutoModelForCausalLM

    _reset_peak(device)
    kwargs: dict = {"dtype": torch.float32}
    if budget is None:
        model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs).to(device).eval()
        extra: dict = {}
    else:  # accelerate: the GPU holds the dense weights and `budget` of the experts, the rest stays on the host
        checkpoint_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        gpu_bytes = checkpoint_bytes - shape.expert_bytes + int(budget * shape.expert_bytes)
        gpu = 0 if device.startswith("cuda") else device
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, device_map="auto", max_memory={gpu: gpu_bytes, "cpu": 64 * 2**30}, **kwargs
        ).eval()
        placement = getattr(model, "hf_device_map", {})  # absent when everything landed on one device
        on_host = sorted(k for k, v in placement.items() if v == "cpu")
        extra = {"max_memory_gpu_bytes": gpu_bytes, "modules_on_host": on_host}
    tokens, decode_s = greedy(model, prompt, n, device)
    del model
    return {"token_ids": tokens, "decode_s": decode_s, "peak_gpu_bytes": _peak(device), **extra}


def run_moeflow(ckpt: Path, prompt: list[int], n: int, device: str, budget: str, store: str) -> dict:
    _reset_peak(device)
    with moeflow.load(ckpt, expert_budget=budget, store=store, policy="lru", device=device) as engine:
        engine.generate(prompt, max_new_tokens=2)  # warm-up: kernels, allocator
        engine.cache.reset_stats()
        result = engine.generate(prompt, max_new_tokens=n)
        stats = engine.stats()
    return {
        "token_ids": result.token_ids,
        "decode_s": result.elapsed_s - result.prefill_s,
        "peak_gpu_bytes": _peak(device),
        "cache": {k: v for k, v in stats.to_dict().items() if k != "per_layer"},
    }


def takeaway(result: dict) -> str:
    """One line: moeflow at 25% from host RAM against all-resident transformers and accelerate's offload."""
    by_name = {r["name"]: r for r in result["runs"]}
    ours, full, acc = (by_name.get(n) for n in ("moeflow 25%, ram", "transformers (all on GPU)",
                                                 "accelerate offload 25%"))
    if not ours:
        return ""
    text = (f"moeflow with 25% of the experts on the GPU: {ours['decode_tokens_per_s']:.1f} tokens/s in "
            f"{(ours['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB")
    ratios = [f"{ours['decode_tokens_per_s'] / r['decode_tokens_per_s']:.3g}x {what}"
              for r, what in ((full, "all-resident transformers"), (acc, "accelerate's offload")) if r]
    return text + (f" ({', '.join(ratios)})" if ratios else "")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = result["runs"]
    names = [r["name"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    speeds = [r["decode_tokens_per_s"] for r in runs]
    a.barh(names, speeds, color="tab:blue")
    a.set(xlabel="decode tokens/s (higher is better; log scale)", xscale="log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(speeds) / 2 <= t <= max(speeds) * 2]
    a.set_xticks(ticks, [str(t) for t in ticks])
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set_xlim(min(speeds) / 2, max(speeds) * 1.6)
    for i, v in enumerate(speeds):
        a.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    peaks = [(r["peak_gpu_bytes"] or 0) / 2**30 for r in runs]
    b.barh(names, peaks, color="tab:orange")
    b.set(xlabel="peak GPU memory, GiB (lower is better)")
    b.set_xlim(0, max(peaks) * 1.15)
    for i, v in enumerate(peaks):
        b.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    b.set_yticklabels([])
    for ax in (a, b):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    exact = all(r.get("exact", True) for r in runs)
    fig.suptitle(f"{takeaway(result)}\nMixtral-shaped model, {result['shape']['expert_bytes'] / 2**30:.2f} GiB of "
                 f"fp32 experts, {result['tokens']} greedy tokens on {result['device_name']}"
                 + ("; every run's tokens equal the resident run's" if exact else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/moeflow-bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    for field in ("layers", "hidden", "inter", "experts"):
        parser.add_argument(f"--{field}", type=int, default=getattr(Shape(), field))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for a dry run of the script")
    shape = replace(Shape(), layers=args.layers, hidden=args.hidden, inter=args.inter, experts=args.experts)
    ckpt = args.workdir / f"mixtral-random-{shape.layers}x{shape.experts}-{shape.hidden}-{shape.inter}"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt, shape)
    prompt = [(7 * i + 3) % shape.vocab for i in range(32)]
    device, n = args.device, args.tokens
    plans = [
        ("transformers (all on GPU)", lambda: run_transformers(ckpt, prompt, n, device, shape, None)),
        ("moeflow all, ram", lambda: run_moeflow(ckpt, prompt, n, device, "all", "ram")),
        ("moeflow 50%, ram", lambda: run_moeflow(ckpt, prompt, n, device, "50%", "ram")),
        ("moeflow 25%, ram", lambda: run_moeflow(ckpt, prompt, n, device, "25%", "ram")),
        ("moeflow 25%, disk", lambda: run_moeflow(ckpt, prompt, n, device, "25%", "disk")),
        ("accelerate offload 25%", lambda: run_transformers(ckpt, prompt, n, device, shape, 0.25)),
    ]
    runs = []
    for name, fn in plans:
        t0 = time.perf_counter()
        r = {"name": name, **fn()}
        r["decode_tokens_per_s"] = (len(r["token_ids"]) - 1) / r["decode_s"]
        r["exact"] = r["token_ids"] == runs[0]["token_ids"] if runs else True
        runs.append(r)
        hit = r.get("cache", {}).get("hit_rate")
        hit_text = f"  hit {hit:.3f}" if hit is not None else ""
        peak = (r["peak_gpu_bytes"] or 0) / 2**30
        print(f"{name:28s} {r['decode_tokens_per_s']:8.2f} tok/s  peak GPU {peak:6.2f} GiB  exact={r['exact']}"
              f"{hit_text}  ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    result = {"bench": BENCH, "command": " ".join(sys.argv), "device": device, "device_name": name,
              "torch": torch.__version__, "shape": {**vars(shape), "expert_bytes": shape.expert_bytes},
              "tokens": n, "runs": runs}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{BENCH}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{BENCH}.png")
    print(f"wrote {args.out / (BENCH + '.json')} and {args.out / (BENCH + '.png')}")
    return 0 if all(r["exact"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
