"""Routers: the Triton kernels (TRITON_INTERPRET=1) against the torch references and against
transformers' own routers (MixtralTopKRouter, Qwen3MoeTopKRouter, DeepseekV3TopkRouter).

Shape legend: T tokens, E experts, K experts per token, H hidden.
"""

from __future__ import annotations

import pytest
import torch
from moeflow.kernels import grouped_topk_sigmoid, grouped_topk_sigmoid_reference, topk_softmax, topk_softmax_reference
from moeflow.kernels.backend import INTERPRETING

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 set before import (conftest)")


def _same_routing(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Same experts with the same weights per token; order within a token may differ."""
    (w_got, i_got), (w_want, i_want) = got, want
    order_got, order_want = i_got.argsort(dim=-1), i_want.argsort(dim=-1)
    assert torch.equal(i_got.gather(1, order_got), i_want.gather(1, order_want))
    torch.testing.assert_close(w_got.gather(1, order_got), w_want.gather(1, order_want).float(), rtol=1e-6, atol=1e-7)


# (T, E, K, why)
SOFTMAX_CASES = [
    (1, 8, 2, "T=1: decode"),
    (19, 8, 2, "Mixtral's E and K; T not a multiple of the 16-token program"),
    (6, 7, 7, "K == E, prime E: every expert picked, padded row of 8 columns"),
    (5, 64, 8, "Qwen/OLMoE-sized E and K"),
    (3, 3, 1, "K=1"),
]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T, E, K, why", SOFTMAX_CASES)
def test_topk_softmax_matches_reference(T: int, E: int, K: int, why: str, renormalize: bool) -> None:
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E))
    w, ids = topk_softmax(logits, K, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (T, K)
    w_ref, ids_ref = topk_softmax_reference(logits, K, renormalize)
    assert torch.equal(ids, ids_ref), why
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_softmax_reads_low_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(9, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    _same_routing(topk_softmax(logits, 4), topk_softmax_reference(logits, 4, True))


def test_topk_softmax_ties_go_to_the_lower_expert() -> None:
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0]])
    _, ids = topk_softmax(logits, 2)
    assert ids.tolist() == [[1, 2]]


def test_topk_softmax_matches_transformers_routers() -> None:
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    hidden = torch.randn(13, 32)
    mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2))
    qwen_config = Qwen3MoeConfig(hidden_size=32, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False)
    qwen = Qwen3MoeTopKRouter(qwen_config)
    for router, renormalize in ((mixtral, True), (qwen, False)):
        torch.nn.init.normal_(router.weight)
        with torch.no_grad():
            logits, weights, ids = router(hidden)
        _same_routing(topk_softmax(logits, router.top_k, renormalize), (weights, ids))


# (T, E, K, n_group, topk_group, why)
GROUPED_CASES = [
    (1, 16, 4, 4, 2, "T=1"),
    (17, 16, 4, 4, 2, "a group scores its top two; T over one program"),
    (4, 256, 8, 8, 4, "DeepSeek-V3's E=256, K=8, 8 groups keep 4"),
    (5, 12, 3, 3, 2, "group size 4 with 3 groups: E not a power of two"),
    (6, 14, 2, 7, 7, "prime group count, every group kept"),
    (3, 8, 2, 1, 1, "one group: plain sigmoid top-k with bias"),
]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("T, E, K, G, TG, why", GROUPED_CASES)
def test_grouped_topk_sigmoid_matches_reference(T: int, E: int, K: int, G: int, TG: int, why: str, norm: bool) -> None:
    gen = torch.Generator().manual_seed(E + T)
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.5
    got = grouped_topk_sigmoid(logits, bias, K, G, TG, norm, 2.5)
    want = grouped_topk_sigmoid_reference(logits, bias, K, G, TG, norm, 2.5)
    assert torch.equal(got[1], want[1]), why
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_grouped_topk_sigmoid_bias_selects_but_does_not_weigh() -> None:
    """A big bias on expert 3 makes it chosen, but its weight is its unbiased sigmoid score."""
    logits = torch.zeros(1, 8)
    logits[0, 0] = 4.0
    bias = torch.zeros(8)
    bias[3] = 10.0
    w, ids = grouped_topk_sigmoid(logits, bias, 2, 1, 1, norm_topk_prob=False, routed_scaling_factor=1.0)
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.5, torch.sigmoid(torch.tensor(4.0)).item()]]))


def test_grouped_topk_sigmoid_matches_transformers_deepseek_v3() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=16,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(std=0.3)
    hidden = torch.randn(11, 32)
    with torch.no_grad():
        logits, weights, ids = router(hidden)
    got = grouped_topk_sigmoid(logits, router.e_score_correction_bias, 4, 4, 2, True, 2.5)
    _same_routing(got, (weights, ids))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, b: topk_softmax(x, 9), "k must be"),
        (lambda x, b: topk_softmax(x[0], 2), r"\[T, E\]"),
        (lambda x, b: grouped_topk_sigmoid(x, b, 2, 3, 1), "equal groups"),
        (lambda x, b: grouped_topk_sigmoid(x, b, 6, 4, 1), "cannot supply"),
        (lambda x, b: grouped_topk_sigmoid(x, b[:4], 2, 4, 2), "e_score_correction_bias"),
    ],
)
def test_bad_router_arguments_raise_value_error(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 8), torch.zeros(8))
