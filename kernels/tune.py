"""Tune the fused MoE tiles on this GPU and store the winners as data.

    python -m moeflow.kernels.tune --experts 8 --hidden 4096 --inter 14336 --top-k 2 --dtype bfloat16

For each token count, every candidate tile runs the whole forward (metadata, gate/up, down,
reduction) replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``); the fastest is written to
``kernels/configs/fused_moe_<gpu name>.json`` under the shape's key, merged with what is there.
Autotuning only happens here, on a GPU: under ``TRITON_INTERPRET=1`` it refuses (``@triton.autotune``
does not work in the interpreter, and interpreter timings mean nothing).

Shape legend: T tokens, D hidden, I expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

import torch
from moeflow.kernels.backend import INTERPRETING, device_key
from moeflow.kernels.config import CONFIG_DIR, TileConfig, shape_key

from moeflow.options import add_options, options_from_args


@dataclass(frozen=True, kw_only=True)
class TuneSettings:
    experts: int
    hidden: int
    inter: int
    top_k: int
    dtype: str = "bfloat16"
    tokens: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype name (bfloat16, float16, float32)")


def candidates() -> list[TileConfig]:
    grid = itertools.product((16, 32, 64, 128), (32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    return [TileConfig(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=s) for m, n, k, w, s in grid]


def tune(settings: TuneSettings) -> dict[int, TileConfig]:
    """The fastest candidate per token count, timed on the current GPU."""
    if INTERPRETING or not torch.cuda.is_available():
        raise RuntimeError("tuning needs a GPU and does not run under TRITON_INTERPRET=1")
    import triton.testing
    from moeflow.kernels.fused_moe import fused_moe

    gen = torch.Generator(device="cuda").manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    E, D, I, K = settings.experts, settings.hidden, settings.inter, settings.top_k
    gate_up_E2ID = torch.randn(E, 2 * I, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5
    down_EDI = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=gen) * I**-0.5
    best: dict[int, TileConfig] = {}
    for T in settings.tokens:
        hidden_TD = torch.randn(T, D, device="cuda", dtype=dtype, generator=gen)
        logits_TE = torch.randn(T, E, device="cuda", generator=gen)
        weights_TK, ids_TK = torch.topk(logits_TE.softmax(-1), K, dim=-1)
        args = (hidden_TD, gate_up_E2ID, down_EDI, weights_TK, ids_TK)
        timings = []
        for cfg in candidates():
            try:
                # Replayed from a CUDA graph: the launch cost is the same for every tile and would only
                # add noise (at T=1 it is most of an eager call).
                ms = triton.testing.do_bench_cudagraph(lambda cfg=cfg, args=args: fused_moe(*args, config=cfg))
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                continue
            timings.append((ms, cfg))
        ms, best[T] = min(timings, key=lambda x: x[0])
        print(f"T={T}: {ms * 1e3:.1f} us with {best[T]}", flush=True)
    return best


def write(settings: TuneSettings, best: dict[int, TileConfig]) -> str:
    device = device_key(torch.device("cuda"))
    path = CONFIG_DIR / f"fused_moe_{device}.json"
    data = json.loads(path.read_text()) if path.exists() else {"note": f"tuned by kernels/tune.py on {device}"}
    configs = data.setdefault("configs", {})
    for key, by_t in json.loads((CONFIG_DIR / "fused_moe_default.json").read_text())["configs"].items():
        configs.setdefault(key, by_t)  # untuned shapes and dtypes of this GPU keep the generic defaults
    key = shape_key(settings.experts, settings.hidden, settings.inter, settings.top_k, getattr(torch, settings.dtype))
    configs[key] = {str(t): cfg.to_json() for t, cfg in sorted(best.items())}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return str(path)


def settings_from_argv(argv: list[str] | None = None) -> TuneSettings:
    """`python -m moeflow.kernels.tune`'s options, generated from `TuneSettings` (moeflow.options)."""
    parser = argparse.ArgumentParser(description=(TuneSettings.__doc__ or "").strip() or None)
    add_options(parser, TuneSettings)
    return options_from_args(TuneSettings, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_argv(argv)
    print(f"wrote {write(settings, tune(settings))}")


if __name__ == "__main__":
    main()
