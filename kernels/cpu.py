"""The fused MoE on the CPU, in torch: several formulations and GEMM backends, and the measured fastest.

Shape legend: T tokens, D hidden, I expert hidden, K experts per token, S slots in the weight pool,
P = T*K (token, k) pairs, V pairs with a real slot, n rows served by one slot.

Every formulation does what transformers' ``grouped_mm`` experts do, in the weights' dtype: gate/up
GEMM, the gate (``gate``: transformers' ``_apply_gate`` of the family; None is SiLU(gate) * up), down
GEMM, times the routing weight (promoting to its dtype), then ``y.view(T, K, D).sum(1)``, the K
weighted outputs of a token summed in k order. Slot ids outside [0, S) are sentinels: the pair
contributes exactly zero. All are plain torch ops, differentiable by autograd with the ``"mm"``
backend, and run on CUDA tensors too: ``kernels.experts`` builds its exact path from them.

GEMM backends (fp32; other dtypes always use ``torch.mm``, which already goes to oneDNN for bf16):

- ``"mm"``: ``torch.mm``, MKL sgemm in torch's CPU build, the GEMM library transformers' experts use
  (measured: mostly bit-identical to its grouped_mm experts, else ~1e-7 relative).
- ``"blas"``: numpy's matmul on the tensors' own memory, i.e. the BLAS numpy was built with (OpenBLAS in
  numpy's wheels). On this project's AMD EPYC, where MKL takes its generic path, one-row GEMMs (decode) run
  1.3-1.85x faster than MKL's from D*I = 2^16 with OpenBLAS on one thread (the table below). With more BLAS
  threads they stall as soon as another process wants a core (median 2.94 ms against MKL's 2.66 at E=8,
  T=1, worst 29 ms, one core busy; one thread: 2.21 ms, worst 3.0), so plans take it only while
  ``limit_blas_threads(1)`` holds (the engine sets BLAS threads to its compute threads with
  ``--kernels fast``, else to one). Another summation order: ~1e-7 relative from transformers in fp32.
- ``"onednn"``: oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU
  backend emits) on the same plain weight tensors, no copy kept. On this project's AMD EPYC it runs
  1.5-2.2x faster than MKL sgemm once the expert matrices are big (MKL takes a generic path on
  non-Intel CPUs), but costs more per call, so small experts stay on MKL; its summation order
  differs, so results differ from transformers by ~1e-7 relative (tested <= 2e-6).

``bench/moe_block.py`` measures every formulation x backend against transformers. ``cpu_plan`` picks
the formulation: from this machine's own measurements when ``python -m moeflow.kernels.tune_cpu`` has stored
them (``configs/cpu_<cpu model>_<threads>t.json``), else by ``builtin_plan``, the crossovers measured
on the project's 2-core AMD EPYC (the table below). They do not carry over: on a 16-core Xeon the
built-in choice of oneDNN lost to grouped_mm at T=16 and 128 (0.55-0.83x).
"""

from __future__ import annotations

import json
import math
import platform
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from moeflow.kernels import backend
from moeflow.kernels.config import CONFIG_DIR

Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_nIn, w_OutxIn) -> x @ w.T


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, w.t())


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        return torch.mm(x, w.t())
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _blas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """numpy's matmul on the tensors' own memory (no copy): the BLAS numpy was built with (OpenBLAS in its
    wheels). fp32/fp64 CPU tensors outside autograd; anything else goes to ``torch.mm``."""
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu" or x.requires_grad or w.requires_grad:
        return torch.mm(x, w.t())
    return torch.from_numpy(x.numpy() @ w.numpy().T)


GEMMS: dict[str, Gemm] = {"mm": _mm, "blas": _blas}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    GEMMS["onednn"] = _onednn

_blas_threads: int | None = None  # what `limit_blas_threads` last set (None: numpy's BLAS as it came)


def limit_blas_threads(n: int) -> None:
    """Set the threads of numpy's BLAS, process-wide (threadpoolctl), like ``torch.set_num_threads``; with one,
    the built-in plan computes one-row GEMMs with it (``"blas"``)."""
    from threadpoolctl import threadpool_limits

    global _blas_threads
    threadpool_limits(limits=n, user_api="blas")
    _blas_threads = n


# Measured on the 2-core AMD EPYC, fp32, K=2, median ms of 25 interleaved rounds:
#                   T=1 pair loop       T=4 sorted               T=16 sorted
#   D*I             mm      onednn      mm     onednn  grouped   mm     onednn  grouped
#   192*192 (E=16)  0.090   0.184       0.166  0.320   0.162     0.443  0.771   0.373  (the default model)
#   256*256         0.060   0.097       0.181  0.267   0.179     0.423  0.569   0.386
#   384*384         0.146   0.207       0.354  0.515   0.395     1.157  0.978   1.058
#   512*512         0.210   0.243       1.072  0.783   1.148     2.914  1.732   2.963
#   512*1024        0.262   0.212                                4.79   2.62
#   1024*2048       3.45    2.15                                 23.5   10.7
# oneDNN costs more per call than MKL and wins once a call has enough work: with several rows per
# expert from D*I = 2^18, or from 2^17 with at least 16 pairs. Below that, torch's grouped_mm (MKL
# inside, one call per projection) beats a Python loop over slots. One row per GEMM stays on MKL at
# every size: oneDNN wins there only on an idle machine (from D*I = 2^19; 2.15 vs 3.45 ms at
# 1024*2048), while with another process on a core its two-thread calls stall (medians 9.9 and
# 17 ms vs MKL's 3.0 and 3.8 ms at E=8 and E=64, bench/moe_block.py, T=1); MKL's one-row GEMM did not.
#
# One row per GEMM (the pair loop, T=1 and 2), MKL against numpy's OpenBLAS on one thread, K=2, median ms of 25
# (ad hoc, the same machine, quiet): T=1 192*192 0.049 / 0.047, 256*256 0.085 / 0.065, 384*384 0.164 / 0.113,
# 512*512 0.396 / 0.214, 512*1024 0.734 / 0.529, 1024*2048 2.56 / 1.87, 192*8192 (the I/O-bound bench model)
# 2.75 / 1.60; T=2 from 384*384 alike (0.293 / 0.208 ... 5.61 / 3.07), below it MKL by ~10%.
ONEDNN_MIN_DI = 2**18
BLAS_MIN_DI = 2**16
ONEDNN_MIN_DI_16_PAIRS = 2**17
# Sorting by slot costs ~60 us and only pays when pairs share a slot: never at T=1 (a token's K
# experts differ), rarely with up to 4 pairs (E=8, D*I=1024*2048: pair loop 4.5 ms vs sorted 4.9 ms
# at T=2, 8.4 vs 6.7 ms at T=4).
PAIR_LOOP_MAX_PAIRS = 4


Gate = Callable[[torch.Tensor], torch.Tensor]  # gate/up product [n, 2I] -> activation [n, I]


def silu_and_mul(h_n2I: torch.Tensor) -> torch.Tensor:
    """transformers' default gate (``_default_apply_gate`` with SiLU): SiLU(gate half) * up half."""
    I = h_n2I.shape[-1] // 2
    return F.silu(h_n2I[:, :I]).mul_(h_n2I[:, I:])


def _expert_mlp(x_nD: torch.Tensor, gate_up_2ID: torch.Tensor, down_DI: torch.Tensor, gemm: Gemm, gate: Gate,
                bias_2I: torch.Tensor | None = None, bias_D: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One expert's MLP; the biases, when given, are added after each GEMM, in place, as transformers adds them."""
    return expert_output(expert_hidden(x_nD, gate_up_2ID, gemm, gate, bias_2I), down_DI, gemm, bias_D)


def expert_hidden(x_nD: torch.Tensor, gate_up_2ID: torch.Tensor, gemm: Gemm, gate: Gate,
                  bias_2I: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`_expert_mlp`'s first half: the gate/up GEMM (its bias added in place), through the gate: [n, I]."""
    h_n2I = gemm(x_nD, gate_up_2ID)
    if bias_2I is not None:
        h_n2I.add_(bias_2I)
    return gate(h_n2I)


def expert_output(h_nI: torch.Tensor, down_DI: torch.Tensor, gemm: Gemm, bias_D: torch.Tensor | None = None
                  ) -> torch.Tensor:  # fmt: skip
    """`_expert_mlp`'s second half: the down GEMM (its bias added in place): [n, D]."""
    y_nD = gemm(h_nI, down_DI)
    if bias_D is not None:
        y_nD.add_(bias_D)
    return y_nD


Biases = tuple[torch.Tensor, torch.Tensor] | None  # per slot: gate_up bias [S, 2I], down bias [S, D]


def _slot_biases(biases: Biases, s: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if biases is None else (biases[0][s], biases[1][s])


def _per_slot(pool: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Something to index by slot. Under autograd, ``unbind``: the backward of S selects would zero-fill
    S full-size gradients (a 4x slower expert backward at 8 experts); unbind's backward is one stack."""
    return pool.unbind(0) if pool.requires_grad and torch.is_grad_enabled() else pool


def _weight_and_sum(y_PD: torch.Tensor, weights_TK: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum over k, in k order, of weights[t, k] * y[t * K + k]; with no weights, the pairs' rows
    themselves (``experts_rows``: summed later, when every pair has its row)."""
    if weights_TK is None:
        return y_PD
    T, K = weights_TK.shape
    w_P1 = weights_TK.reshape(-1, 1)
    y_PD = y_PD.mul_(w_P1) if w_P1.dtype == y_PD.dtype else y_PD * w_P1
    return y_PD.view(T, K, y_PD.shape[1]).sum(dim=1).to(out_dtype)


def _unsort(y_VD: torch.Tensor, order_V: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Rows by sorted position back to rows by pair; pairs without a slot get zeros."""
    return y_VD.new_zeros(num_pairs, y_VD.shape[1]).index_copy(0, order_V, y_VD)


def _sorted_by_slot(ids_TK: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """-> (pairs with a real slot ordered by slot, pairs per slot [S] on the ids' device, the same as a list).

    ``torch.sort``, as transformers' grouped_mm experts sort (on the CPU its default sort orders equal
    ids differently from ``stable=True`` for long inputs), so a slot's rows come in transformers' order."""
    ids_P = ids_TK.reshape(-1)
    key_P = torch.where((ids_P >= 0) & (ids_P < num_slots), ids_P, num_slots)  # sentinels sort last
    order_P = torch.sort(key_P).indices
    counts_S = torch.bincount(key_P, minlength=num_slots + 1)[:num_slots]
    # One host sync: the per-slot row counts (the loop over slots; grouped_mm's row total).
    counts = counts_S.tolist()
    return order_P[: sum(counts)], counts_S, counts


def moe_sorted(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor,
    gemm: str = "mm",
    gate: Gate | None = None,
    biases: Biases = None,
) -> torch.Tensor:
    """Sort pairs by slot, gather their rows once, one gate/up and one down GEMM per used slot.

    With ``"mm"`` this is what grouped_mm does on the CPU (one ``torch.mm`` per group), bit for bit."""
    T, D = hidden_TD.shape
    K = ids_TK.shape[1]
    order_V, _, counts = _sorted_by_slot(ids_TK, gate_up_S2ID.shape[0])
    x_VD = hidden_TD.index_select(0, order_V // K)
    gate_up, down = _per_slot(gate_up_S2ID), _per_slot(down_SDI)
    outs, start = [], 0
    for s, n in enumerate(counts):
        if n:
            mlp_args = (gate_up[s], down[s], GEMMS[gemm], gate or silu_and_mul, *_slot_biases(biases, s))
            outs.append(_expert_mlp(x_VD[start : start + n], *mlp_args))
            start += n
    y_VD = torch.cat(outs) if outs else x_VD.new_zeros(0, D)
    return _weight_and_sum(_unsort(y_VD, order_V, T * K), weights_TK, hidden_TD.dtype)


def moe_pair_loop(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor,
    gemm: str = "mm",
    gate: Gate | None = None,
    biases: Biases = None,
) -> torch.Tensor:
    """One (token, k) pair at a time: no sort, no gather; for decode-sized batches."""
    T, D = hidden_TD.shape
    S, K = gate_up_S2ID.shape[0], ids_TK.shape[1]
    gate_up, down = _per_slot(gate_up_S2ID), _per_slot(down_SDI)
    rows = []
    # One host sync: the slot ids pick the weight matrices.
    for p, s in enumerate(ids_TK.reshape(-1).tolist()):
        t = p // K
        if 0 <= s < S:
            mlp_args = (gate_up[s], down[s], GEMMS[gemm], gate or silu_and_mul, *_slot_biases(biases, s))
            rows.append(_expert_mlp(hidden_TD[t : t + 1], *mlp_args))
        else:
            rows.append(hidden_TD.new_zeros(1, D))
    y_PD = torch.cat(rows) if rows else hidden_TD.new_zeros(0, D)
    return _weight_and_sum(y_PD, weights_TK, hidden_TD.dtype)


def moe_grouped_mm(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor,
    gate: Gate | None = None,
    biases: Biases = None,
) -> torch.Tensor:
    """Sort pairs by slot, then one ``F.grouped_mm`` per projection over every slot: transformers'
    grouped_mm experts on a slot pool, the same arithmetic (biases gathered per row and added in place,
    as transformers adds them). Needs ``backend.grouped_mm_fits``."""
    T, D = hidden_TD.shape
    K = ids_TK.shape[1]
    order_V, counts_S, _ = _sorted_by_slot(ids_TK, gate_up_S2ID.shape[0])
    offsets_S = counts_S.cumsum(0, dtype=torch.int32)
    x_VD = hidden_TD.index_select(0, order_V // K)
    h_V2I = F.grouped_mm(x_VD, gate_up_S2ID.transpose(-2, -1), offs=offsets_S)
    slot_V = ids_TK.reshape(-1)[order_V] if biases is not None else None
    if biases is not None:
        h_V2I.add_(biases[0][slot_V])
    y_VD = F.grouped_mm((gate or silu_and_mul)(h_V2I), down_SDI.transpose(-2, -1), offs=offsets_S)
    if biases is not None:
        y_VD.add_(biases[1][slot_V])
    return _weight_and_sum(_unsort(y_VD, order_V, T * K), weights_TK, hidden_TD.dtype)


# Every inference formulation x backend, by name, for the tests and the benchmark.
CPU_FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    **{
        f"{name}[{gemm}]": (lambda *a, _f=fn, _g=gemm: _f(*a, gemm=_g))
        for name, fn in (("sorted", moe_sorted), ("pair_loop", moe_pair_loop))
        for gemm in GEMMS
    },
    "grouped_mm": moe_grouped_mm,
}


@cache
def _cpu_model() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    return re.sub(r"[^A-Za-z0-9]+", "_", model).strip("_")


def machine_key() -> str:
    """This CPU's model and torch's thread count, as a file-name-safe key: what a measured plan is valid for."""
    return f"{_cpu_model()}_{torch.get_num_threads()}t"


def measured_path(key: str) -> Path:
    return CONFIG_DIR / f"cpu_{key}.json"


@cache
def measured_points(key: str) -> tuple[dict, ...]:
    """The points ``kernels.tune_cpu`` stored for machine `key` (empty if none): each has ``di``
    (hidden x inter), ``K`` (top-k), ``pairs`` (tokens x top-k) and the ``winner`` formulation."""
    path = measured_path(key)
    if not path.exists():
        return ()
    return tuple(p for p in json.loads(path.read_text())["points"] if p["winner"] in CPU_FORMULATIONS)


def cpu_plan(num_tokens: int, top_k: int, hidden: int, inter: int) -> str:
    """The ``CPU_FORMULATIONS`` key ``fused_moe_cpu`` runs for this call shape: the winner at the nearest
    shape this machine measured (in log2: hidden x inter first, then top-k, then pairs), else ``builtin_plan``."""
    points = measured_points(machine_key())
    if not points:
        return builtin_plan(num_tokens, top_k, hidden, inter)
    pairs, di = num_tokens * top_k, hidden * inter

    def distance(p: dict) -> tuple[float, float, float]:
        return abs(math.log2(p["di"] / di)), abs(math.log2(p["K"] / top_k)), abs(math.log2(p["pairs"] / pairs))

    return min(points, key=distance)["winner"]


def builtin_plan(num_tokens: int, top_k: int, hidden: int, inter: int) -> str:
    """The plan by the crossovers measured on the project's 2-core AMD EPYC (the table above)."""
    pairs, di = num_tokens * top_k, hidden * inter
    onednn = "onednn" in GEMMS
    if num_tokens == 1 or pairs <= PAIR_LOOP_MAX_PAIRS:  # one row per GEMM call
        blas = _blas_threads == 1 and di >= (BLAS_MIN_DI if num_tokens == 1 else 2 * BLAS_MIN_DI)
        return "pair_loop[blas]" if blas else "pair_loop[mm]"
    if onednn and (di >= ONEDNN_MIN_DI or (di >= ONEDNN_MIN_DI_16_PAIRS and pairs >= 16)):
        return "sorted[onednn]"
    return "grouped_mm"


def fused_moe_cpu(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    gemm: str | None = None,
) -> torch.Tensor:
    """The CPU path of ``kernels.fused_moe`` (arguments already checked): the formulation ``cpu_plan``
    picks. ``gemm``: a key of ``GEMMS`` to force that backend (with the pair loop or the sorted loop);
    ``"mm"`` uses the GEMM library transformers uses. Differentiable: under autograd the loops use
    ``torch.mm`` (oneDNN's inner product has no autograd formula: torch warns and returns wrong grads)."""
    args = (hidden_TD, gate_up_S2ID, down_SDI, weights_TK, ids_TK)
    return CPU_FORMULATIONS[_plan(args, gemm)](*args)


def planned_moe(
    hidden_TD: torch.Tensor,
    gate_up_S2ID: torch.Tensor,
    down_SDI: torch.Tensor,
    weights_TK: torch.Tensor | None,
    ids_TK: torch.Tensor,
    *,
    gate: Gate | None = None,
    biases: Biases = None,
) -> torch.Tensor:
    """``fused_moe_cpu``'s formulation with a family's own ``gate`` and expert ``biases`` (any family, within fp32
    rounding of the exact path); ``weights_TK`` None: the pairs' rows before their routing weights, as
    ``kernels.experts_rows`` gives them."""
    args = (hidden_TD, gate_up_S2ID, down_SDI, weights_TK, ids_TK)
    plan = _plan(args, None)
    if plan == "grouped_mm":
        return moe_grouped_mm(*args, gate=gate, biases=biases)
    name, gemm = plan.rstrip("]").split("[")
    return (moe_pair_loop if name == "pair_loop" else moe_sorted)(*args, gemm=gemm, gate=gate, biases=biases)


def _plan(args: tuple, gemm: str | None) -> str:
    """The ``CPU_FORMULATIONS`` key for a call with these arguments (x, gate_up, down, weights, ids), `gemm` forced."""
    if gemm is not None and gemm not in GEMMS:
        raise ValueError(f"cpu gemm {gemm!r} is not one of {sorted(GEMMS)}")
    hidden_TD, gate_up_S2ID, down_SDI, _, ids_TK = args
    (T, D), (K, I) = hidden_TD.shape, (ids_TK.shape[1], down_SDI.shape[2])
    plan = cpu_plan(T, K, D, I)
    if plan == "grouped_mm" and not backend.grouped_mm_fits(gate_up_S2ID, down_SDI):
        plan = "sorted[mm]"
    if gemm is not None:
        plan = f"{plan.split('[')[0].replace('grouped_mm', 'sorted')}[{gemm}]"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
        plan = plan.replace("[onednn]", "[mm]")
    return plan
