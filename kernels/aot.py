"""Compile every Triton kernel for a GPU architecture on a machine without a GPU; check shared memory.

    python -m moeflow.kernels.aot --arch 86 90

CI has no GPU, and the interpreter forgives what the compiler rejects (types, layouts, shapes) and
never runs out of shared memory. This drives the real launchers with small CPU tensors, but every
kernel launch only compiles (Triton -> PTX -> cubin with the bundled ptxas) for the named
architecture: the forward and backward of the fused MoE for fp32, fp16 and bf16 and every tile in
``configs/fused_moe_default.json`` for that dtype, the routing metadata, and both routers. It fails
when a kernel does not compile or needs more shared memory than the architecture gives a block
(``SHARED_LIMIT_BYTES``), i.e. when that kernel would raise ``OutOfResources`` on that GPU.

Must run without ``TRITON_INTERPRET`` (Triton fixes compiled vs interpreted when the kernels are
defined). Relies on two Triton internals, checked against the pinned triton 3.7: the active driver
(replaced by a stand-in that names the target) and ``JITFunction.run(..., warmup=True)``.

Shape legend: T tokens, D hidden, I expert hidden, S slots, K experts per token, E router experts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from moeflow.kernels.backend import INTERPRETING
from moeflow.kernels.config import CONFIG_DIR, TileConfig, default_key
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Largest shared memory one block may opt into, in bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True, kw_only=True)
class Compiled:
    arch: int
    kernel: str
    case: str  # what the launcher was called for: dtype and tile, or the router's shape
    shared_bytes: int
    num_warps: int
    num_stages: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT_BYTES[self.arch]


class _TargetOnlyDriver:
    """Stands in for the CUDA driver: names the target; nothing is ever launched through it."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch  # JITFunction caches its binder (and target) per device: one per arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextmanager
def _compile_only(arch: int, out: list[Compiled], case: list[str]) -> Iterator[None]:
    original, previous_driver = JITFunction.run, driver._active  # no default driver exists without a GPU

    def run(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        meta = kernel.metadata
        out.append(Compiled(arch=arch, kernel=self.__name__, case=case[0], shared_bytes=meta.shared,
                            num_warps=meta.num_warps, num_stages=meta.num_stages))  # fmt: skip
        return kernel

    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
        driver._active = previous_driver


def _stored_tiles(dtype: torch.dtype) -> dict[str, TileConfig]:
    configs = json.loads((CONFIG_DIR / "fused_moe_default.json").read_text())["configs"]
    by_t = configs.get(default_key(dtype)) or configs["default"]
    return {t: TileConfig(**cfg) for t, cfg in by_t.items()}


def _fused_moe_calls(case: list[str]) -> None:
    from moeflow.kernels.fused_moe import launch_backward, launch_forward
    from moeflow.kernels.metadata import sort_pairs_reference

    T, D, I, S, K = 40, 128, 96, 5, 2
    gen = torch.Generator().manual_seed(0)
    ids_TK = torch.randint(0, S, (T, K), generator=gen)
    weights_TK = torch.rand(T, K, generator=gen)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden_TD = torch.randn(T, D, generator=gen).to(dtype)
        gate_up = torch.randn(S, 2 * I, D, generator=gen).to(dtype)
        down = torch.randn(S, D, I, generator=gen).to(dtype)
        for t, cfg in _stored_tiles(dtype).items():
            case[0] = f"{str(dtype).removeprefix('torch.')} T>={t} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
            launch_forward(hidden_TD, gate_up, down, weights_TK, ids_TK, cfg, save_for_backward=True)
            meta = sort_pairs_reference(ids_TK, S, cfg.block_m)  # real indices: the backward reads them on the host
            NP = meta.sorted_pair_ids_NP.shape[0]
            act, preact = torch.zeros(NP, I, dtype=dtype), torch.zeros(NP, 2 * I, dtype=dtype)
            launch_backward(hidden_TD, hidden_TD, gate_up, down, weights_TK, ids_TK, act, preact, meta, cfg)


def _router_calls(case: list[str]) -> None:
    from moeflow.kernels.routing import launch_grouped_topk_sigmoid, launch_topk_softmax

    for dtype in (torch.float32, torch.bfloat16):
        for T, E, K in ((1, 8, 2), (64, 64, 8)):
            case[0] = f"topk_softmax {str(dtype).removeprefix('torch.')} E={E} K={K}"
            launch_topk_softmax(torch.randn(T, E).to(dtype), K, renormalize=True)
        case[0] = f"grouped_topk_sigmoid {str(dtype).removeprefix('torch.')} E=256 K=8"
        launch_grouped_topk_sigmoid(torch.randn(16, 256).to(dtype), torch.zeros(256), 8, 8, 4, True, 2.5)


def compile_all(arch: int) -> list[Compiled]:
    """Compile every kernel for ``arch`` (e.g. 90 for H100) through the launchers; nothing runs."""
    if INTERPRETING:
        raise RuntimeError("kernels.aot compiles kernels: run it without TRITON_INTERPRET=1")
    if arch not in SHARED_LIMIT_BYTES:
        raise ValueError(f"arch {arch}: known architectures are {sorted(SHARED_LIMIT_BYTES)}")
    out: list[Compiled] = []
    case = [""]
    with _compile_only(arch, out, case):
        _fused_moe_calls(case)
        _router_calls(case)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[86, 90], help="compute capabilities, e.g. 80 86 90")
    parser.add_argument("--json", action="store_true", help="print one JSON object per compiled kernel")
    args = parser.parse_args(argv)
    rows = [row for arch in args.arch for row in compile_all(arch)]
    for row in rows:
        if args.json:
            print(json.dumps({**asdict(row), "fits": row.fits}))
        elif not row.fits or row.shared_bytes > SHARED_LIMIT_BYTES[row.arch] // 2:
            print(f"sm_{row.arch} {row.kernel:<28} {row.case:<36} shared {row.shared_bytes / 1024:6.1f} KiB "
                  f"of {SHARED_LIMIT_BYTES[row.arch] / 1024:.0f}{'' if row.fits else '  TOO MUCH'}")  # fmt: skip
    too_big = [row for row in rows if not row.fits]
    if not args.json:
        print(f"{len(rows)} kernels compiled for sm_{', sm_'.join(map(str, args.arch))}; {len(too_big)} over the limit")
    if too_big:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
