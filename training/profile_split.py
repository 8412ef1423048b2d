"""Choose the number of chunks d by online profiling.

On the first training step, with the step's real row count, every rank times (a) an all-to-all
and (b) the local experts' forward and backward on 1/1, 1/2, 1/4, ... of the rows. Each cost is
fitted as time = a + b * bytes (a: fixed cost per call, latency; b: per byte). The pipeline of
`training.overlap` is then simulated for every d (one communication channel in issue order, one
compute thread) and the fastest d is taken. Timings are max-reduced over the group first, so every
rank fits the same lines and picks the same d.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from moeflow.training.expert_parallel import ExpertComm
from moeflow.training.experts import ExpertFn
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class LinearFit:
    """seconds = fixed_s + per_byte_s * bytes (least squares, both clamped at >= 0)."""

    fixed_s: float
    per_byte_s: float

    def __call__(self, num_bytes: float) -> float:
        return self.fixed_s + self.per_byte_s * num_bytes


@dataclass(frozen=True, kw_only=True)
class SplitProfile:
    num_bytes: int  # one rank's rows for one all-to-all, the whole step (d = 1)
    all_to_all: LinearFit
    expert_forward: LinearFit
    expert_backward: LinearFit
    predicted_step_s: dict[int, float] = field(default_factory=dict)  # d -> simulated fwd+bwd seconds
    num_chunks: int = 1


def fit_linear(num_bytes: Sequence[float], seconds: Sequence[float]) -> LinearFit:
    mean_x, mean_y = statistics.fmean(num_bytes), statistics.fmean(seconds)
    var_x = sum((x - mean_x) ** 2 for x in num_bytes)
    slope = 0.0 if var_x == 0 else sum((x - mean_x) * (y - mean_y) for x, y in zip(num_bytes, seconds)) / var_x
    slope = max(slope, 0.0)
    return LinearFit(fixed_s=max(mean_y - slope * mean_x, 0.0), per_byte_s=slope)


def simulate_phase(num_chunks: int, comm_s: float, compute_s: float) -> float:
    """Makespan of: issue X0; for i: issue X(i+1), wait Xi, compute i, issue Yi; wait all Y —
    with the all-to-alls served one at a time in issue order, each taking comm_s."""
    channel_free = 0.0
    now = 0.0
    arrival: dict[int, float] = {}

    def issue(at: float) -> float:
        nonlocal channel_free
        channel_free = max(at, channel_free) + comm_s
        return channel_free

    arrival[0] = issue(now)
    for i in range(num_chunks):
        if i + 1 < num_chunks:
            arrival[i + 1] = issue(now)
        now = max(now, arrival[i]) + compute_s
        issue(now)
    return max(now, channel_free)


def predict_step(num_chunks: int, profile: SplitProfile) -> float:
    chunk_bytes = profile.num_bytes / num_chunks
    comm_s = profile.all_to_all(chunk_bytes)
    return simulate_phase(num_chunks, comm_s, profile.expert_forward(chunk_bytes)) + simulate_phase(
        num_chunks, comm_s, profile.expert_backward(chunk_bytes)
    )


def choose_num_chunks(profile: SplitProfile, max_chunks: int) -> SplitProfile:
    """The d with the smallest predicted step; a larger d must win by more than 2% to be taken."""
    predicted = {d: predict_step(d, profile) for d in range(1, max_chunks + 1)}
    best = 1
    for d in range(2, max_chunks + 1):
        if predicted[d] < 0.98 * predicted[best]:
            best = d
    return SplitProfile(
        num_bytes=profile.num_bytes,
        all_to_all=profile.all_to_all,
        expert_forward=profile.expert_forward,
        expert_backward=profile.expert_backward,
        predicted_step_s=predicted,
        num_chunks=best,
    )


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001 - any zero-argument callable
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def profile_split(
    *,
    comm: ExpertComm,
    expert_fn: ExpertFn,
    gate_up_X2ID: Tensor,
    down_XDI: Tensor,
    num_rows: int,
    max_chunks: int,
    repeats: int = 3,
) -> SplitProfile:
    """Collective: every rank of `comm` must call it at the same point with the same max_chunks."""
    rows = torch.tensor([num_rows], dtype=torch.int64)
    if comm.distributed:
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=comm.group)
    num_rows = max(int(rows), comm.world_size * comm.num_local_experts)
    hidden = gate_up_X2ID.shape[-1]
    element_bytes = gate_up_X2ID.element_size()
    divisors = [d for d in (1, 2, 4, 8, 16) if d <= max(max_chunks, 2)]
    gate_up = gate_up_X2ID.detach().clone().requires_grad_(True)
    down = down_XDI.detach().clone().requires_grad_(True)
    sizes, timings = [], []
    for d in divisors:
        rows_d = max(num_rows // d, comm.world_size)
        per_rank = [rows_d // comm.world_size] * comm.world_size
        x_ND = torch.randn(sum(per_rank), hidden, dtype=gate_up.dtype, device=gate_up.device)
        per_expert = [x_ND.shape[0] // comm.num_local_experts] * comm.num_local_experts
        per_expert[-1] += x_ND.shape[0] - sum(per_expert)

        def exchange(x_ND: Tensor = x_ND, per_rank: list[int] = per_rank) -> None:
            comm.start_all_to_all(x_ND, input_splits=per_rank, output_splits=per_rank).wait()

        def forward(x_ND: Tensor = x_ND, per_expert: list[int] = per_expert) -> Tensor:
            return expert_fn(x_ND, per_expert, gate_up, down)

        exchange()  # warm-up: connections, allocator
        comm_s = _median_seconds(exchange, repeats)
        forward_s = _median_seconds(forward, repeats)
        outputs = [forward() for _ in range(repeats)]
        backward_s = statistics.median(_median_seconds(lambda y=y: y.backward(torch.ones_like(y)), 1) for y in outputs)
        sizes.append(x_ND.numel() * element_bytes)
        timings.append([comm_s, forward_s, backward_s])
    timings_N3 = torch.tensor(timings, dtype=torch.float64)
    if comm.distributed:
        dist.all_reduce(timings_N3, op=dist.ReduceOp.MAX, group=comm.group)
    comm_s, forward_s, backward_s = timings_N3.t().tolist()
    profile = SplitProfile(
        num_bytes=num_rows * hidden * element_bytes,
        all_to_all=fit_linear(sizes, comm_s),
        expert_forward=fit_linear(sizes, forward_s),
        expert_backward=fit_linear(sizes, backward_s),
    )
    return choose_num_chunks(profile, max_chunks)
