"""Routing metadata: pairs sorted by slot, padded per slot with sentinel indices.

The Triton kernels (TRITON_INTERPRET=1) must give exactly the torch reference's layout, and both
must satisfy the invariants the GEMM kernels rely on.

Shape legend: T tokens, K experts per token, P = T*K pairs, S slots.
"""

from __future__ import annotations

import pytest
import torch
from moeflow.kernels import SortedPairs, sort_pairs, sort_pairs_reference
from moeflow.kernels.backend import INTERPRETING
from moeflow.kernels.metadata import padded_bound

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 set before import (conftest)")


def _ids(kind: str, T: int, K: int, S: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(T * 31 + K * 7 + S)
    if kind == "one_slot":
        return torch.full((T, K), S - 1, dtype=torch.int64)
    if kind == "skip_slot":
        ids = torch.randint(0, S - 1, (T, K), generator=gen)
        return torch.where(ids >= 1, ids + 1, ids)  # slot 1 never used
    if kind == "sentinels":
        ids = torch.randint(-3, S + 3, (T, K), generator=gen)
        ids[0, 0] = torch.iinfo(torch.int64).max  # far out of range must not wrap into a real slot
        return ids
    if kind == "all_sentinels":
        return torch.full((T, K), -1, dtype=torch.int64)
    return torch.randint(0, S, (T, K), generator=gen)


# (kind, T, K, S, block_m, why)
CASES = [
    ("random", 1, 2, 4, 16, "T=1"),
    ("one_slot", 40, 1, 4, 16, "every pair to one slot: a run of three blocks, other slots empty"),
    ("skip_slot", 8, 2, 4, 16, "a slot with no pairs owns no block"),
    ("random", 5, 3, 3, 16, "K == S"),
    ("random", 12, 2, 7, 16, "prime S"),
    ("sentinels", 30, 3, 5, 16, "ids < 0 and >= S (int64 max too) are left out"),
    ("all_sentinels", 3, 2, 4, 16, "nothing computed in this wave: no block at all"),
    ("random", 9, 8, 70, 32, "S over one 32-slot tile; block_m 32"),
    ("random", 200, 2, 5, 64, "P=400 over several 64-pair chunks: the cross-chunk prefix"),
]


def check_invariants(meta: SortedPairs, ids_TK: torch.Tensor, S: int) -> None:
    P, bm = ids_TK.numel(), meta.block_m
    ids_P = ids_TK.reshape(-1)
    valid = ((ids_P >= 0) & (ids_P < S)).tolist()
    num_padded = int(meta.num_padded_1)
    sorted_ids = meta.sorted_pair_ids_NP.tolist()
    assert len(sorted_ids) == padded_bound(P, S, bm) and num_padded % bm == 0
    real = [p for p in sorted_ids if p != P]
    assert sorted(real) == [p for p in range(P) if valid[p]], "every real pair exactly once"
    assert all(p == P for p in sorted_ids[num_padded:]), "past num_padded: only sentinels"
    for b, slot in enumerate(meta.block_slot_ids_NB.tolist()):
        rows = sorted_ids[b * bm : (b + 1) * bm]
        if b * bm >= num_padded:
            assert slot == -1
            continue
        assert any(p != P for p in rows), "no all-padding block below num_padded"
        assert all(int(ids_P[p]) == slot for p in rows if p != P), "a block serves a single slot"
    for s, (start, count) in enumerate(zip(meta.slot_start_S.tolist(), meta.slot_count_S.tolist())):
        assert start % bm == 0
        run = sorted_ids[start : start + count]
        assert all(int(ids_P[p]) == s for p in run) and run == sorted(run), "a slot's run, in pair order"
    pos = meta.pair_pos_P.tolist()
    assert all((sorted_ids[pos[p]] == p) if valid[p] else pos[p] == -1 for p in range(P))


@pytest.mark.parametrize("kind, T, K, S, block_m, why", CASES)
def test_sort_pairs_matches_reference(kind: str, T: int, K: int, S: int, block_m: int, why: str) -> None:
    ids = _ids(kind, T, K, S)
    got, want = sort_pairs(ids, S, block_m), sort_pairs_reference(ids, S, block_m)
    for name, a, b in zip(("sorted", "block_slot", "start", "count", "num_padded", "pair_pos"), got.tensors(),
                          want.tensors()):  # fmt: skip
        assert torch.equal(a, b), f"{name} differs ({why})"
    check_invariants(got, ids, S)
    check_invariants(want, ids, S)


def test_sort_pairs_takes_int32_ids() -> None:
    ids = _ids("random", 6, 2, 5)
    assert torch.equal(sort_pairs(ids.int(), 5, 16).sorted_pair_ids_NP, sort_pairs(ids, 5, 16).sorted_pair_ids_NP)


def test_sort_pairs_large_prefill() -> None:
    """P=4096 pairs over 64 slots: 64-pair chunks, a 64-step cross-chunk prefix, 96 blocks."""
    ids = _ids("random", 512, 8, 64)
    got = sort_pairs(ids, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors(), sort_pairs_reference(ids, 64, 64).tensors()))
