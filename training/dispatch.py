"""Order and restore: the bookkeeping around the all-to-all.

order    sort the routed assignments by (chunk, expert). Chunk c holds the tokens
         [c*T/d, (c+1)*T/d), so a token's copies all travel in one chunk; experts are contiguous
         per rank, so within a chunk the rows for rank r form one block (the all-to-all split).
         One small count exchange (and one host sync) tells every rank what it will receive.
restore  weight each returned row by its routing weight and sum the rows back into their tokens.

Shapes: the project legend (moeflow/__init__.py): P routed assignments, X experts per rank, N rows of
one chunk received by this rank; here d is the number of chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moeflow.training.expert_parallel import ExpertComm
from moeflow.training.routing import Routes
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class ChunkLayout:
    """Where one chunk's rows go and come from."""

    send_start: int  # first row of the chunk in this rank's sorted assignments
    send_splits: tuple[int, ...]  # rows sent to each rank
    recv_splits: tuple[int, ...]  # rows received from each rank (source-major, then expert)
    tokens_per_expert_X: tuple[int, ...]  # received rows per local expert
    to_expert_major_N: Tensor | None  # gather index: source-major rows -> expert-major (None: already)
    to_source_major_N: Tensor | None  # its inverse

    @property
    def send_rows(self) -> int:
        return sum(self.send_splits)

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_splits)


@dataclass(frozen=True, kw_only=True)
class DispatchPlan:
    order_P: Tensor  # permutation of the assignments into (chunk, expert) order
    chunks: tuple[ChunkLayout, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)


def plan_dispatch(routes: Routes, *, num_tokens: int, num_chunks: int, comm: ExpertComm) -> DispatchPlan:
    """Collective over the group when it has more than one rank (all ranks, same num_chunks)."""
    device = routes.expert_ids_P.device
    num_experts, ranks, local = comm.num_experts, comm.world_size, comm.num_local_experts
    chunk_P = routes.token_ids_P * num_chunks // max(num_tokens, 1)
    key_P = chunk_P * num_experts + routes.expert_ids_P
    order_P = torch.argsort(key_P, stable=True)
    counts_dRX = torch.bincount(key_P, minlength=num_chunks * num_experts).view(num_chunks, ranks, local)
    recv_RdX = comm.exchange_counts(counts_dRX)
    # Host sync: split sizes must be Python ints for the all-to-alls and the per-expert matmuls.
    send, recv = counts_dRX.tolist(), recv_RdX.tolist()
    chunks = []
    start = 0
    for c in range(num_chunks):
        recv_RX = [recv[r][c] for r in range(ranks)]
        to_expert_major, to_source_major = _expert_major_index(recv_RX, device)
        send_splits = tuple(sum(send[c][r]) for r in range(ranks))
        chunks.append(
            ChunkLayout(
                send_start=start,
                send_splits=send_splits,
                recv_splits=tuple(sum(row) for row in recv_RX),
                tokens_per_expert_X=tuple(sum(recv_RX[r][e] for r in range(ranks)) for e in range(local)),
                to_expert_major_N=to_expert_major,
                to_source_major_N=to_source_major,
            )
        )
        start += sum(send_splits)
    return DispatchPlan(order_P=order_P, chunks=tuple(chunks))


def _expert_major_index(recv_RX: list[list[int]], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    ranks, local = len(recv_RX), len(recv_RX[0])
    if ranks == 1 or local == 1:
        return None, None
    segment_expert = torch.arange(local, device=device).repeat(ranks)
    segment_rows = torch.tensor([n for row in recv_RX for n in row], device=device)
    expert_of_row_N = torch.repeat_interleave(segment_expert, segment_rows)
    to_expert_major_N = torch.argsort(expert_of_row_N, stable=True)
    to_source_major_N = torch.empty_like(to_expert_major_N)
    to_source_major_N[to_expert_major_N] = torch.arange(to_expert_major_N.numel(), device=device)
    return to_expert_major_N, to_source_major_N


def restore(y_PD: Tensor, weights_P: Tensor, token_ids_P: Tensor, num_tokens: int) -> Tensor:
    """out[t] = sum over t's assignments of weight * expert output (rows in any order)."""
    weighted_PD = y_PD * weights_P.to(y_PD.dtype)[:, None]
    return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add(0, token_ids_P, weighted_PD)
