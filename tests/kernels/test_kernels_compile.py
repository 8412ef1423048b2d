"""The Triton kernels compile for real GPUs (sm_86, sm_90) and fit their shared memory, on a CPU-only host.

The interpreter (every other kernel test) forgives what the compiler rejects; ``kernels.aot`` compiles
each kernel through the real launchers with the bundled ptxas, launching nothing. It must run without
TRITON_INTERPRET, which conftest sets for this process, so it runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moeflow.kernels.aot import SHARED_LIMIT_BYTES, Compiled

KERNELS = {
    "_gate_up_kernel", "_rows_gemm_kernel", "_sum_topk_kernel", "_down_bwd_kernel", "_slot_wgrad_kernel",
    "_count_rank_kernel", "_chunk_prefix_kernel", "_slot_start_kernel", "_blocks_kernel", "_scatter_kernel",
    "_topk_softmax_kernel", "_grouped_topk_sigmoid_kernel",
}  # fmt: skip


@pytest.mark.slow  # ~70 s on the shared 2-core machine with a cold Triton cache, seconds with a warm one
def test_every_kernel_compiles_for_sm86_and_sm90_within_shared_memory() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "moeflow.kernels.aot", "--arch", "86", "90", "--json"], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=900)  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr[-4000:] + "\n".join(str(r) for r in rows if not r["fits"])
    for arch in (86, 90):
        compiled = {r["kernel"] for r in rows if r["arch"] == arch}
        assert compiled == KERNELS, f"sm_{arch}: missing {sorted(KERNELS - compiled)}"
        dtypes_tiles = {r["case"] for r in rows if r["arch"] == arch and r["kernel"] == "_gate_up_kernel"}
        assert {c.split()[0] for c in dtypes_tiles} == {"float32", "float16", "bfloat16"}
    assert all(r["fits"] for r in rows)


def test_shared_memory_check_flags_a_kernel_over_the_limit() -> None:
    at_limit = Compiled(arch=86, kernel="k", case="c", shared_bytes=SHARED_LIMIT_BYTES[86], num_warps=4, num_stages=3)
    over = Compiled(arch=86, kernel="k", case="c", shared_bytes=SHARED_LIMIT_BYTES[86] + 1, num_warps=4, num_stages=3)
    assert at_limit.fits and not over.fits
