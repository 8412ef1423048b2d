"""Routing metadata: the (token, k) pairs sorted by the slot that serves them, cut into blocks.

Shape legend: T tokens, K experts per token, P = T*K (token, k) pairs, S slots in the weight pool,
NP the padded pair count (upper bound), NB = NP / BLOCK_M blocks.

A pair p = t*K + k is served by slot ``ids_TK[t, k]``. The grouped GEMMs want every block of
BLOCK_M rows to use one slot's weights, so each slot's pairs are padded up to a multiple of BLOCK_M.
Padding is done with *indices*: padded rows hold the sentinel pair id P, which every kernel masks;
no activation is ever copied to build this layout.

A slot id outside [0, S) is a sentinel too: the pair is not computed here and contributes zero (the
engine computes a layer in waves when the pool cannot hold every expert it needs at once).

The order is deterministic: within a slot, pairs keep ascending p (a stable sort by slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Slots per tile and blocks per program. The pairs per counting program (the chunk) grow with P so
# that the sequential prefix over chunks stays at most ~256 steps.
_SLOT_TILE = 32
_BLOCK_TILE = 64


def _chunk(num_pairs: int) -> int:
    return min(512, max(64, triton.next_power_of_2(triton.cdiv(num_pairs, 256))))


@dataclass(frozen=True, kw_only=True)
class SortedPairs:
    """The layout the fused MoE kernels read. All tensors live on the device of ``ids_TK``.

    sorted_pair_ids_NP: int32 [NP]; position -> pair id p, or P for padding (and past num_padded).
    block_slot_ids_NB: int32 [NB]; block -> slot whose weights it uses, -1 past num_padded.
    slot_start_S: int32 [S]; first position of a slot's rows (a multiple of block_m).
    slot_count_S: int32 [S]; how many real pairs a slot serves (its rows are
        slot_start_S[s] .. slot_start_S[s] + slot_count_S[s] - 1).
    num_padded_1: int32 [1]; positions in use (a multiple of block_m); kept on the device, so
        building the layout never syncs with the host.
    pair_pos_P: int32 [P]; the inverse map, pair -> its position, or -1 for a sentinel pair.
    """

    sorted_pair_ids_NP: torch.Tensor
    block_slot_ids_NB: torch.Tensor
    slot_start_S: torch.Tensor
    slot_count_S: torch.Tensor
    num_padded_1: torch.Tensor
    pair_pos_P: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.block_slot_ids_NB.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the order the custom ops pass them around."""
        return (
            self.sorted_pair_ids_NP, self.block_slot_ids_NB, self.slot_start_S, self.slot_count_S,
            self.num_padded_1, self.pair_pos_P,
        )  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...], block_m: int, num_pairs: int) -> SortedPairs:
        sorted_ids, block_slot, slot_start, slot_count, num_padded, pair_pos = tensors
        return cls(
            sorted_pair_ids_NP=sorted_ids, block_slot_ids_NB=block_slot, slot_start_S=slot_start,
            slot_count_S=slot_count, num_padded_1=num_padded, pair_pos_P=pair_pos, block_m=block_m,
            num_pairs=num_pairs,
        )  # fmt: skip


def padded_bound(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Largest padded length possible: every used slot wastes at most block_m - 1 rows."""
    worst = num_pairs + min(num_slots, num_pairs) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


# --------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------


def sort_pairs_reference(ids_TK: torch.Tensor, num_slots: int, block_m: int) -> SortedPairs:
    """The same layout with torch ops: a stable sort by slot, then per-slot padding."""
    dev = ids_TK.device
    P = ids_TK.numel()
    S = num_slots
    NP = padded_bound(P, S, block_m)
    ids_P = ids_TK.reshape(-1).long()
    valid_P = (ids_P >= 0) & (ids_P < S)
    key_P = torch.where(valid_P, ids_P, S)  # sentinels sort last
    key_sorted, order_P = torch.sort(key_P, stable=True)
    count_S = torch.bincount(key_P, minlength=S + 1)[:S]
    padded_S = (count_S + block_m - 1) // block_m * block_m
    start_S = torch.cumsum(padded_S, 0) - padded_S
    first_S = torch.cumsum(count_S, 0) - count_S  # where each slot's run begins in the unpadded sort
    n_valid = int(valid_P.sum())
    slot_of = key_sorted[:n_valid]
    dest = start_S[slot_of] + torch.arange(n_valid, device=dev) - first_S[slot_of]
    sorted_pair_ids = torch.full((NP,), P, dtype=torch.int32, device=dev)
    sorted_pair_ids[dest] = order_P[:n_valid].int()
    pair_pos = torch.full((P,), -1, dtype=torch.int32, device=dev)
    pair_pos[order_P[:n_valid]] = dest.int()
    num_padded = int(padded_S.sum())
    block_slot = torch.full((NP // block_m,), -1, dtype=torch.int32, device=dev)
    block_slot[: num_padded // block_m] = torch.repeat_interleave(
        torch.arange(S, device=dev), padded_S // block_m
    ).int()
    return SortedPairs(
        sorted_pair_ids_NP=sorted_pair_ids,
        block_slot_ids_NB=block_slot,
        slot_start_S=start_S.int(),
        slot_count_S=count_S.int(),
        num_padded_1=torch.tensor([num_padded], dtype=torch.int32, device=dev),
        pair_pos_P=pair_pos,
        block_m=block_m,
        num_pairs=P,
    )


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _count_rank_kernel(
    ids_ptr,  # [P] int32/int64 slot per pair (contiguous)
    chunk_count_ptr,  # [num_chunks, S] int32, written: pairs of each slot in this chunk
    rank_ptr,  # [P] int32, written: how many earlier pairs of this chunk share the slot
    P,
    S,
    CHUNK: tl.constexpr,
    SLOT_TILE: tl.constexpr,
):
    """Grid (cdiv(P, CHUNK),). One-hot [CHUNK, SLOT_TILE] tiles; a pair matches one slot at most."""
    chunk = tl.program_id(0)
    p = chunk * CHUNK + tl.arange(0, CHUNK)
    raw = tl.load(ids_ptr + p, mask=p < P, other=-1)
    slot = tl.where((raw >= 0) & (raw < S), raw, -1).to(tl.int32)  # -1: sentinel, or outside the chunk
    rank = tl.zeros((CHUNK,), dtype=tl.int32)
    for s0 in range(0, S, SLOT_TILE):
        s = s0 + tl.arange(0, SLOT_TILE)
        hit = (slot[:, None] == s[None, :]).to(tl.int32)  # a sentinel (-1) hits no slot
        before = tl.cumsum(hit, axis=0) - hit
        rank += tl.sum(before * hit, axis=1)
        tl.store(chunk_count_ptr + chunk * S + s, tl.sum(hit, axis=0), mask=s < S)
    tl.store(rank_ptr + p, rank, mask=p < P)


@triton.jit
def _chunk_prefix_kernel(
    chunk_count_ptr,  # [num_chunks, S] int32; rewritten in place to the exclusive prefix over chunks
    slot_count_ptr,  # [S] int32, written: real pairs per slot
    num_chunks,
    S,
    SLOT_TILE: tl.constexpr,
):
    """Grid (cdiv(S, SLOT_TILE),). Sequential over chunks, parallel over slots."""
    s = tl.program_id(0) * SLOT_TILE + tl.arange(0, SLOT_TILE)
    s_ok = s < S
    running = tl.zeros((SLOT_TILE,), dtype=tl.int32)
    for c in range(0, num_chunks):
        n = tl.load(chunk_count_ptr + c * S + s, mask=s_ok, other=0)
        tl.store(chunk_count_ptr + c * S + s, running, mask=s_ok)
        running += n
    tl.store(slot_count_ptr + s, running, mask=s_ok)


@triton.jit
def _slot_start_kernel(
    slot_count_ptr,  # [S] int32
    slot_start_ptr,  # [S] int32, written: first position of each slot's padded run
    num_padded_ptr,  # [1] int32, written
    S,
    BLOCK_M: tl.constexpr,
    SLOT_TILE: tl.constexpr,
):
    """Grid (1,). Exclusive prefix sum of the padded counts, one slot tile at a time."""
    carry = tl.zeros((1,), dtype=tl.int32)
    for s0 in range(0, S, SLOT_TILE):
        s = s0 + tl.arange(0, SLOT_TILE)
        s_ok = s < S
        count = tl.load(slot_count_ptr + s, mask=s_ok, other=0)
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        tl.store(slot_start_ptr + s, carry + tl.cumsum(padded, axis=0) - padded, mask=s_ok)
        carry += tl.sum(padded, axis=0)
    tl.store(num_padded_ptr + tl.arange(0, 1), carry)


@triton.jit
def _blocks_kernel(
    slot_start_ptr,  # [S] int32
    slot_count_ptr,  # [S] int32
    num_padded_ptr,  # [1] int32
    block_slot_ptr,  # [NB] int32, written
    sorted_ptr,  # [NP] int32, written with the sentinel P (the scatter kernel then fills real rows)
    S,
    NB,
    P,
    BLOCK_M: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
    SLOT_TILE: tl.constexpr,
):
    """Grid (cdiv(NB, BLOCK_TILE),). Block b belongs to the number of slots whose padded run ends at
    or before b * BLOCK_M (runs are laid out in slot order)."""
    b = tl.program_id(0) * BLOCK_TILE + tl.arange(0, BLOCK_TILE)
    row0 = b * BLOCK_M
    owner = tl.zeros((BLOCK_TILE,), dtype=tl.int32)
    for s0 in range(0, S, SLOT_TILE):
        s = s0 + tl.arange(0, SLOT_TILE)
        s_ok = s < S
        start = tl.load(slot_start_ptr + s, mask=s_ok, other=0)
        count = tl.load(slot_count_ptr + s, mask=s_ok, other=0)
        end = start + (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        owner += tl.sum(((end[None, :] <= row0[:, None]) & s_ok[None, :]).to(tl.int32), axis=1)
    num_padded = tl.load(num_padded_ptr)
    owner = tl.where(row0 < num_padded, owner, -1)
    tl.store(block_slot_ptr + b, owner, mask=b < NB)
    rows = row0[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ptr + rows, tl.zeros((BLOCK_TILE, BLOCK_M), dtype=tl.int32) + P, mask=(b < NB)[:, None])


@triton.jit
def _scatter_kernel(
    ids_ptr,  # [P] slot per pair
    chunk_prefix_ptr,  # [num_chunks, S] int32 exclusive prefix over chunks
    rank_ptr,  # [P] int32
    slot_start_ptr,  # [S] int32
    sorted_ptr,  # [NP] int32, real rows written
    pair_pos_ptr,  # [P] int32, written: position of each pair, -1 for a sentinel
    P,
    S,
    CHUNK: tl.constexpr,
):
    """Grid (cdiv(P, CHUNK),). position = slot start + pairs of the slot in earlier chunks + rank."""
    chunk = tl.program_id(0)
    p = chunk * CHUNK + tl.arange(0, CHUNK)
    raw = tl.load(ids_ptr + p, mask=p < P, other=-1)
    ok = (raw >= 0) & (raw < S)
    slot = tl.where(ok, raw, 0).to(tl.int32)
    start = tl.load(slot_start_ptr + slot, mask=ok, other=0)
    before = tl.load(chunk_prefix_ptr + chunk * S + slot, mask=ok, other=0)
    rank = tl.load(rank_ptr + p, mask=ok, other=0)
    pos = start + before + rank
    tl.store(sorted_ptr + pos, p, mask=ok)
    tl.store(pair_pos_ptr + p, tl.where(ok, pos, -1), mask=p < P)


# --------------------------------------------------------------------------------------------------
# launcher and custom op
# --------------------------------------------------------------------------------------------------


def launch_sort_pairs(
    ids_TK: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if ids_TK.dim() != 2 or ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_TK must be an int32/int64 [T, K] tensor, got {ids_TK.dtype} {tuple(ids_TK.shape)}")
    if num_slots < 1 or block_m < 1:
        raise ValueError(f"num_slots and block_m must be positive, got {num_slots}, {block_m}")
    dev = ids_TK.device
    ids_P = ids_TK.reshape(-1).contiguous()
    P, S = ids_P.numel(), num_slots
    NP = padded_bound(P, S, block_m)
    NB = NP // block_m
    chunk = _chunk(P)
    num_chunks = max(1, triton.cdiv(P, chunk))
    chunk_count = torch.empty(num_chunks, S, dtype=torch.int32, device=dev)
    rank = torch.empty(max(P, 1), dtype=torch.int32, device=dev)
    slot_start = torch.empty(S, dtype=torch.int32, device=dev)
    slot_count = torch.empty(S, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    block_slot = torch.empty(NB, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(NP, dtype=torch.int32, device=dev)
    pair_pos = torch.empty(P, dtype=torch.int32, device=dev)
    _count_rank_kernel[(num_chunks,)](ids_P, chunk_count, rank, P, S, CHUNK=chunk, SLOT_TILE=_SLOT_TILE)
    _chunk_prefix_kernel[(triton.cdiv(S, _SLOT_TILE),)](chunk_count, slot_count, num_chunks, S, SLOT_TILE=_SLOT_TILE)
    _slot_start_kernel[(1,)](slot_count, slot_start, num_padded, S, BLOCK_M=block_m, SLOT_TILE=_SLOT_TILE)
    if NB:
        _blocks_kernel[(triton.cdiv(NB, _BLOCK_TILE),)](
            slot_start, slot_count, num_padded, block_slot, sorted_ids, S, NB, P,
            BLOCK_M=block_m, BLOCK_TILE=_BLOCK_TILE, SLOT_TILE=_SLOT_TILE,
        )  # fmt: skip
    _scatter_kernel[(num_chunks,)](ids_P, chunk_count, rank, slot_start, sorted_ids, pair_pos, P, S, CHUNK=chunk)
    return sorted_ids, block_slot, slot_start, slot_count, num_padded, pair_pos


@torch.library.custom_op("moeflow::sort_pairs", mutates_args=())
def _sort_pairs_op(
    ids_TK: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_sort_pairs(ids_TK, num_slots, block_m)


@_sort_pairs_op.register_fake
def _(
    ids_TK: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    NP = padded_bound(ids_TK.numel(), num_slots, block_m)

    def i32(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int32, device=ids_TK.device)

    return i32(NP), i32(NP // block_m), i32(num_slots), i32(num_slots), i32(1), i32(ids_TK.numel())


def sort_pairs(ids_TK: torch.Tensor, num_slots: int, block_m: int) -> SortedPairs:
    """Sort the (token, k) pairs of ``ids_TK`` by slot and pad each slot to a multiple of block_m.

    Ids outside [0, num_slots) are sentinels: those pairs are left out. Triton; no host sync.
    """
    return SortedPairs.from_tensors(_sort_pairs_op(ids_TK, num_slots, block_m), block_m, ids_TK.numel())
