"""The expert-parallel group as one rank sees it: which experts live here, and the all-to-alls.

Rank r of an R-rank group owns experts [r*X, (r+1)*X), X = E / R. Without a group (or with a
group of one) every expert is local and an all-to-all is a no-op, so the single-process layer and
the expert-parallel layer run the same code.

gloo (CPU) and nccl (GPU) both run an async collective off the calling thread, which is what lets
chunk i's all-to-all proceed while the main thread computes chunk i-1's experts.

Shapes: the project legend (moeflow/__init__.py); here d is the number of chunks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from moeflow.training.timeline import Timeline
from torch import Tensor


class PendingTensor:
    """A tensor that an async all-to-all is still filling. `wait()` returns it once complete."""

    def __init__(
        self, tensor: Tensor, work: dist.Work | None, timeline: Timeline | None = None, label: str = ""
    ) -> None:
        self._tensor = tensor
        self._work = work
        self._timeline = timeline
        self._label = label

    def wait(self) -> Tensor:
        if self._work is not None:
            started = time.perf_counter()
            self._work.wait()
            if self._timeline is not None:
                self._timeline.add("wait", self._label, started, time.perf_counter())
            self._work = None
        return self._tensor


class ExpertComm:
    """All-to-all plumbing for one expert-parallel group (None: single process)."""

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if num_experts % self.world_size:
            raise ValueError(
                f"{num_experts} experts cannot be split evenly over {self.world_size} ranks; "
                "choose a group size that divides the number of experts"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size
        self.first_expert = self.rank * self.num_local_experts

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def exchange_counts(self, counts_dRX: Tensor) -> Tensor:
        """Each rank sends, per chunk, how many rows it has for each expert of each rank; returns
        what it will receive: [R source ranks, d chunks, X local experts]. Blocking (tiny)."""
        send_RdX = counts_dRX.transpose(0, 1).contiguous()
        if not self.distributed:
            return send_RdX
        recv_RdX = torch.empty_like(send_RdX)
        dist.all_to_all_single(recv_RdX, send_RdX, group=self.group)
        return recv_RdX

    def start_all_to_all(
        self,
        input_ND: Tensor,
        *,
        input_splits: Sequence[int],
        output_splits: Sequence[int],
        out_ND: Tensor | None = None,
        timeline: Timeline | None = None,
        label: str = "",
    ) -> PendingTensor:
        """Start sending rows input_splits[r] to rank r; returns the received rows (source-major)."""
        if not self.distributed:
            if out_ND is None:
                return PendingTensor(input_ND, None)
            out_ND.copy_(input_ND)
            return PendingTensor(out_ND, None)
        if out_ND is None:
            out_ND = input_ND.new_empty(sum(output_splits), input_ND.shape[1])
        issued = time.perf_counter()
        work = dist.all_to_all_single(
            out_ND,
            input_ND.contiguous(),
            output_split_sizes=list(output_splits),
            input_split_sizes=list(input_splits),
            group=self.group,
            async_op=True,
        )
        if timeline is not None:
            work.get_future().then(lambda _: timeline.add("comm", label, issued, time.perf_counter()))
        return PendingTensor(out_ND, work, timeline, label)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """In place over the group (no-op on a single rank)."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.group)
        return tensor
