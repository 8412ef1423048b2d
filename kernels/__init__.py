"""moeflow kernels: MoE routing and expert compute, Triton on a GPU, torch on the CPU.

Shape letters: the one legend in ``moeflow/__init__.py`` (T tokens, D hidden, I expert intermediate,
E experts, S slots of a weight pool, K top-k, P = T*K (token, k) pairs, G expert groups).

Public API:
    experts_forward(x_TD, gate_up_S2ID, down_SDI, weights_TK, slot_ids_TK, *, gate=None, exact=True) -> out_TD
        the one expert-MLP entry, called by the offload engine and by training: exact=True is transformers'
        grouped_mm arithmetic to the last bit on the CPU, with the family's gate; exact=False is the
        fastest measured path (``fused_moe``). Slot id -1: the pair contributes 0.
    experts_rows(x_TD, gate_up_S2ID, down_SDI, slot_ids_TK, *, gate=None) -> rows_PD;  weighted_sum(rows_PD,
    weights_TK, out_dtype) -> out_TD
        the exact path in two steps: each pair's row before its routing weight, then the sum over k; a layer
        whose experts arrive in batches computes each batch's rows as they land (bit for bit the same).
    pair_hidden(x_1D, gate_up_2ID, *, gate=None) -> h_1I;  pair_row(h_1I, down_DI) -> row_1D
        one token's pair row of experts_rows in two halves (bit for bit): the gate/up half can run while the
        expert's down matrix is still being read.
    fused_moe(hidden_TD, gate_up_proj_E2ID, down_proj_EDI, topk_weights_TK, topk_ids_TK) -> out_TD
        transformers' layout (gate rows then up rows; SiLU). Ids index the first weight dimension, so
        a slot pool works as is; an id outside [0, E) is a pair not computed here (contributes 0).
    topk_softmax(router_logits_TE, k, renormalize) -> (weights_TK fp32, ids_TK int64)
    grouped_topk_sigmoid(router_logits_TE, e_score_correction_bias_E, k, n_group, topk_group,
                         norm_topk_prob, routed_scaling_factor) -> (weights_TK fp32, ids_TK int64)
    sort_pairs(ids_TK, num_slots, block_m) -> SortedPairs  (the routing metadata the kernels read)

fused_moe and the routing kernels run Triton when their tensors are on a GPU or TRITON_INTERPRET=1 is
set (before this package is imported), and torch otherwise (``kernels.backend`` decides).
``kernels.reference`` and the ``*_reference`` functions are the dumb torch versions the tests compare
against.

Not to be confused with the ``kernels`` package of the Hugging Face Hub: transformers probes for
that one, and must not take this package for it (tests/kernels/test_kernels_name_clash.py).
"""

from moeflow.kernels.config import TileConfig
from moeflow.kernels.experts import experts_forward, experts_rows, pair_hidden, pair_row, weighted_sum
from moeflow.kernels.fused_moe import fused_moe
from moeflow.kernels.metadata import SortedPairs, sort_pairs, sort_pairs_reference
from moeflow.kernels.reference import fused_moe_reference
from moeflow.kernels.routing import (
    grouped_topk_sigmoid,
    grouped_topk_sigmoid_reference,
    topk_softmax,
    topk_softmax_reference,
)

__all__ = [
    "SortedPairs",
    "TileConfig",
    "experts_forward",
    "experts_rows",
    "fused_moe",
    "fused_moe_reference",
    "grouped_topk_sigmoid",
    "grouped_topk_sigmoid_reference",
    "pair_hidden",
    "pair_row",
    "sort_pairs",
    "sort_pairs_reference",
    "topk_softmax",
    "topk_softmax_reference",
    "weighted_sum",
]
