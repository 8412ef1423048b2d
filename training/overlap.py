"""dispatch -> experts -> combine, pipelined over d chunks, forward and backward.

Forward, per chunk i:  issue dispatch(i+1) | wait dispatch(i) | experts(i) | issue combine(i)
so chunk i+1's rows are on the wire while chunk i is computed, and chunk i's results travel back
while chunk i+1 is computed. The backward mirrors it: the incoming gradient of chunk i+1 travels
while chunk i's expert backward runs, and chunk i's input gradient is sent back asynchronously.

The expert maths of each chunk is recorded as an ordinary autograd graph on the received rows
(so a fused kernel's own backward is used as is); the backward replays it chunk by chunk with
`torch.autograd.grad`. d = 1 is the plain, unoverlapped schedule.

Shapes: the project legend (moeflow/__init__.py): P this rank's routed rows (sorted by chunk, then
expert), N the rows one chunk brings to this rank, X experts on this rank; d is the number of chunks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from moeflow.training.dispatch import ChunkLayout, DispatchPlan
from moeflow.training.expert_parallel import ExpertComm, PendingTensor
from moeflow.training.experts import ExpertFn
from moeflow.training.timeline import Timeline
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class ExchangeContext:
    """Everything the pipelined exchange needs besides the tensors it differentiates."""

    plan: DispatchPlan
    comm: ExpertComm
    expert_fn: ExpertFn
    timeline: Timeline | None = None


def _rows(tensor_PD: Tensor, chunk: ChunkLayout) -> Tensor:
    return tensor_PD[chunk.send_start : chunk.send_start + chunk.send_rows]


def _recorded(timeline: Timeline | None, label: str) -> AbstractContextManager[None]:
    return timeline.span("compute", label) if timeline is not None else nullcontext()


class _PipelinedExchange(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x_PD: Tensor,
        gate_up_X2ID: Tensor,
        down_XDI: Tensor,
        exchange: ExchangeContext,
        build_graph: bool,
    ) -> Tensor:
        plan, comm, timeline = exchange.plan, exchange.comm, exchange.timeline
        x_PD = x_PD.contiguous()
        y_PD = torch.empty_like(x_PD)
        with torch.enable_grad():
            gate_up_leaf = gate_up_X2ID.detach().requires_grad_(build_graph and ctx.needs_input_grad[1])
            down_leaf = down_XDI.detach().requires_grad_(build_graph and ctx.needs_input_grad[2])
        # Rows that need no gradient (the layer's input is a leaf without grad) skip the input
        # backward of the first projection and the whole return all-to-all of the backward.
        rows_need_grad = build_graph and ctx.needs_input_grad[0]

        def dispatch(i: int) -> PendingTensor:
            chunk = plan.chunks[i]
            return comm.start_all_to_all(
                _rows(x_PD, chunk),
                input_splits=chunk.send_splits,
                output_splits=chunk.recv_splits,
                timeline=timeline,
                label=f"dispatch {i}",
            )

        graphs: list[tuple[Tensor, Tensor] | None] = []
        combines: list[PendingTensor] = []
        pending = dispatch(0)
        for i, chunk in enumerate(plan.chunks):
            upcoming = dispatch(i + 1) if i + 1 < plan.num_chunks else None
            x_ND = pending.wait()
            with torch.set_grad_enabled(build_graph), _recorded(timeline, f"experts fwd {i}"):
                x_leaf_ND = x_ND.detach().requires_grad_(rows_need_grad)
                x_grouped_ND = x_leaf_ND if chunk.to_expert_major_N is None else x_leaf_ND[chunk.to_expert_major_N]
                y_grouped_ND = exchange.expert_fn(x_grouped_ND, chunk.tokens_per_expert_X, gate_up_leaf, down_leaf)
                y_ND = y_grouped_ND if chunk.to_source_major_N is None else y_grouped_ND[chunk.to_source_major_N]
            graphs.append((x_leaf_ND, y_ND))
            combines.append(
                comm.start_all_to_all(
                    y_ND.detach(),
                    input_splits=chunk.recv_splits,
                    output_splits=chunk.send_splits,
                    out_ND=_rows(y_PD, chunk),
                    timeline=timeline,
                    label=f"combine {i}",
                )
            )
            if upcoming is not None:
                pending = upcoming
        for combine in combines:
            combine.wait()
        ctx.exchange = exchange
        ctx.graphs = graphs if build_graph else None
        ctx.weight_leaves = (gate_up_leaf, down_leaf)
        return y_PD

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y_PD: Tensor):  # type: ignore[override]
        exchange: ExchangeContext = ctx.exchange
        plan, comm, timeline = exchange.plan, exchange.comm, exchange.timeline
        graphs: list[tuple[Tensor, Tensor] | None] = ctx.graphs
        gate_up_leaf, down_leaf = ctx.weight_leaves
        grad_y_PD = grad_y_PD.contiguous()
        rows_need_grad = ctx.needs_input_grad[0]
        grad_x_PD = torch.empty_like(grad_y_PD) if rows_need_grad else None
        weight_grads = _WeightGrads()

        def gather_grad(i: int) -> PendingTensor:
            chunk = plan.chunks[i]
            return comm.start_all_to_all(
                _rows(grad_y_PD, chunk),
                input_splits=chunk.send_splits,
                output_splits=chunk.recv_splits,
                timeline=timeline,
                label=f"grad combine {i}",
            )

        returns: list[PendingTensor] = []
        pending = gather_grad(0)
        for i, chunk in enumerate(plan.chunks):
            upcoming = gather_grad(i + 1) if i + 1 < plan.num_chunks else None
            grad_y_ND = pending.wait()
            x_leaf_ND, y_ND = graphs[i]
            graphs[i] = None  # chunk i's graph is freed once its backward has run
            with _recorded(timeline, f"experts bwd {i}"):
                grad_x_ND = _chunk_backward(x_leaf_ND, y_ND, grad_y_ND, gate_up_leaf, down_leaf, weight_grads)
            if grad_x_PD is not None:
                assert grad_x_ND is not None
                returns.append(
                    comm.start_all_to_all(
                        grad_x_ND,
                        input_splits=chunk.recv_splits,
                        output_splits=chunk.send_splits,
                        out_ND=_rows(grad_x_PD, chunk),
                        timeline=timeline,
                        label=f"grad dispatch {i}",
                    )
                )
            if upcoming is not None:
                pending = upcoming
        for pending_return in returns:
            pending_return.wait()
        return grad_x_PD, weight_grads.gate_up, weight_grads.down, None, None


class _WeightGrads:
    """Sum of the chunks' expert-weight gradients (None until a chunk contributes: no zero-fill)."""

    def __init__(self) -> None:
        self.gate_up: Tensor | None = None
        self.down: Tensor | None = None

    def add(self, gate_up: Tensor | None, down: Tensor | None) -> None:
        if gate_up is not None:
            self.gate_up = gate_up if self.gate_up is None else self.gate_up.add_(gate_up)
        if down is not None:
            self.down = down if self.down is None else self.down.add_(down)


def _chunk_backward(
    x_leaf_ND: Tensor,
    y_ND: Tensor,
    grad_y_ND: Tensor,
    gate_up_leaf: Tensor,
    down_leaf: Tensor,
    weight_grads: _WeightGrads,
) -> Tensor | None:
    """Backward of one chunk's expert maths: adds its weight gradients to `weight_grads`, returns
    the received rows' gradient (None when the rows need none)."""
    wanted = [t for t in (x_leaf_ND, gate_up_leaf, down_leaf) if t.requires_grad]
    grads = {}
    if y_ND.grad_fn is not None and wanted:  # else no rows reached this rank's experts in this chunk
        grads = dict(zip(map(id, wanted), torch.autograd.grad(y_ND, wanted, grad_y_ND, allow_unused=True)))
    weight_grads.add(grads.get(id(gate_up_leaf)), grads.get(id(down_leaf)))
    if not x_leaf_ND.requires_grad:
        return None
    grad_x_ND = grads.get(id(x_leaf_ND))
    return grad_x_ND if grad_x_ND is not None else torch.zeros_like(x_leaf_ND)


def pipelined_exchange(x_PD: Tensor, gate_up_X2ID: Tensor, down_XDI: Tensor, exchange: ExchangeContext) -> Tensor:
    """Send each sorted row to its expert, run the experts, bring the outputs back in the same
    row order; differentiable w.r.t. the rows and the local expert weights."""
    build_graph = torch.is_grad_enabled() and (
        x_PD.requires_grad or gate_up_X2ID.requires_grad or down_XDI.requires_grad
    )
    return _PipelinedExchange.apply(x_PD, gate_up_X2ID, down_XDI, exchange, build_graph)
