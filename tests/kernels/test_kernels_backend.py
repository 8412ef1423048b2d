"""Which path ``kernels`` takes: without TRITON_INTERPRET, CPU tensors take the torch path.

This suite runs with TRITON_INTERPRET=1 (conftest), so the check happens in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, time
t0 = time.perf_counter()
import torch, triton
t1 = time.perf_counter()
import moeflow.kernels as kernels
t2 = time.perf_counter()
assert "transformers" not in sys.modules, "importing moeflow.kernels must not pull transformers in"
from moeflow.kernels.cpu import fused_moe_cpu
from moeflow.kernels.backend import INTERPRETING, use_triton
g = torch.Generator().manual_seed(0)
x, gu, dn = torch.randn(5, 32, generator=g), torch.randn(4, 64, 32, generator=g), torch.randn(4, 32, 32, generator=g)
logits = torch.randn(5, 4, generator=g)
w, ids = kernels.topk_softmax(logits, 2)
assert not INTERPRETING and not use_triton(x)
assert torch.equal((w, ids)[1], kernels.topk_softmax_reference(logits, 2, True)[1])
ids[1, 0] = -1
for gemm in ("mm", "onednn"):
    assert torch.equal(kernels.fused_moe(x, gu, dn, w, ids, cpu_gemm=gemm), fused_moe_cpu(x, gu, dn, w, ids, gemm))
print(f"{t2 - t1:.3f}")
"""


@pytest.mark.slow  # a fresh interpreter imports torch: ~5 s on the shared 2-core machine
def test_cpu_tensors_take_the_torch_path_without_the_interpreter() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    import_seconds = float(done.stdout.strip().splitlines()[-1])
    assert import_seconds < 1.0, f"importing moeflow.kernels took {import_seconds:.2f}s on top of torch and triton"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="conftest sets the interpreter")
def test_this_suite_runs_the_triton_kernels_in_the_interpreter() -> None:
    import torch
    from moeflow.kernels.backend import INTERPRETING, use_triton

    assert INTERPRETING and use_triton(torch.zeros(1))
