"""Routing rules against plain per-token loops; the single-process layer against transformers'
Mixtral block; chunked against unchunked; the split-choice model. Single process, fast."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from moeflow.training.dispatch import restore
from moeflow.training.moe_layer import MoELayer, MoELayerConfig
from moeflow.training.profile_split import (
    LinearFit,
    SplitProfile,
    choose_num_chunks,
    fit_linear,
    simulate_phase,
)
from moeflow.training.routing import ExpertChoice, Routes, SigmoidBias, SwitchTop1, TopKSoftmax
from torch.testing import assert_close


def _as_table(routes: Routes) -> list[tuple[int, int, float]]:
    rows = zip(routes.token_ids_P.tolist(), routes.expert_ids_P.tolist(), routes.weights_P.tolist())
    return sorted(rows)


def _assert_same_table(got: list[tuple[int, int, float]], want: list[tuple[int, int, float]]) -> None:
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    assert_close(torch.tensor([w for *_, w in got]), torch.tensor([w for *_, w in want]))


def _reference_token_choice(logits_TE, k, capacity_factor, normalize):
    num_tokens, num_experts = logits_TE.shape
    choices = []  # choices[t] = [(expert, weight)] best first
    for t in range(num_tokens):
        probs = torch.softmax(logits_TE[t].double(), 0).tolist()
        best = sorted(range(num_experts), key=lambda e: -probs[e])[:k]
        total = sum(probs[e] for e in best) if normalize else 1.0
        choices.append([(e, probs[e] / total) for e in best])
    capacity = math.inf if capacity_factor is None else math.ceil(capacity_factor * num_tokens * k / num_experts)
    used = [0] * num_experts
    table = []
    for j in range(k):  # first choices of every token, then second choices, ...
        for t in range(num_tokens):
            e, w = choices[t][j]
            if used[e] < capacity:
                used[e] += 1
                table.append((t, e, w))
    return sorted(table)


@pytest.mark.parametrize(
    "k,capacity_factor,num_tokens,num_experts",
    [
        (2, None, 13, 4),  # Mixtral: dropless, renormalised
        (2, 1.0, 17, 4),  # GShard: capacity drops second choices first
        (2, 0.5, 9, 5),  # heavy dropping, prime E
        (4, None, 6, 4),  # K == E: every token goes everywhere
        (1, None, 1, 3),  # T = 1
    ],
)
def test_top_k_softmax_matches_reference(k, capacity_factor, num_tokens, num_experts):
    torch.manual_seed(k * 100 + num_tokens)
    logits_TE = torch.randn(num_tokens, num_experts) * 2
    routes = TopKSoftmax(k=k, capacity_factor=capacity_factor).route(logits_TE)
    want = _reference_token_choice(logits_TE, k, capacity_factor, normalize=True)
    _assert_same_table(_as_table(routes), want)
    counts = torch.bincount(torch.tensor([e for _, e, _ in want], dtype=torch.int64), minlength=num_experts)
    assert routes.tokens_per_expert_E.tolist() == counts.tolist()


def test_capacity_actually_drops():
    logits_TE = torch.zeros(8, 4)
    logits_TE[:, 0] = 5.0  # every token's first choice is expert 0
    routes = TopKSoftmax(k=1, capacity_factor=1.0).route(logits_TE)
    assert routes.token_ids_P.tolist() == [0, 1]  # C = ceil(8 * 1 / 4) = 2, kept in token order
    assert routes.tokens_per_expert_E.tolist() == [2, 0, 0, 0]


def test_top_k_aux_loss_is_transformers_balance_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(1)
    logits_TE = torch.randn(21, 6)
    routes = TopKSoftmax(k=2, aux_loss_coef=0.5).route(logits_TE)
    assert_close(routes.aux_loss, 0.5 * load_balancing_loss_func((logits_TE,), 6, 2))


def test_z_loss_adds_squared_logsumexp():
    torch.manual_seed(2)
    logits_TE = torch.randn(5, 4)
    plain = TopKSoftmax(k=2, aux_loss_coef=0.0).route(logits_TE).aux_loss
    with_z = TopKSoftmax(k=2, aux_loss_coef=0.0, z_loss_coef=0.1).route(logits_TE).aux_loss
    assert plain.item() == 0.0
    assert_close(with_z, 0.1 * torch.logsumexp(logits_TE, -1).square().mean())


def test_switch_top1_matches_reference():
    torch.manual_seed(3)
    logits_TE = torch.randn(19, 4) * 2
    routes = SwitchTop1(capacity_factor=1.25).route(logits_TE)
    _assert_same_table(_as_table(routes), _reference_token_choice(logits_TE, 1, 1.25, normalize=False))


def test_expert_choice_matches_reference():
    torch.manual_seed(4)
    num_tokens, num_experts, factor = 11, 3, 1.5
    logits_TE = torch.randn(num_tokens, num_experts)
    routes = ExpertChoice(capacity_factor=factor).route(logits_TE)
    capacity = math.ceil(factor * num_tokens / num_experts)
    probs = torch.softmax(logits_TE.double(), 1)
    want = []
    for e in range(num_experts):
        best = sorted(range(num_tokens), key=lambda t: -probs[t, e].item())[:capacity]
        want += [(t, e, probs[t, e].item()) for t in best]
    _assert_same_table(_as_table(routes), sorted(want))
    assert routes.aux_loss.item() == 0.0


@pytest.mark.parametrize("num_groups,topk_groups", [(1, 1), (4, 2)])
def test_sigmoid_bias_matches_reference(num_groups, topk_groups):
    torch.manual_seed(5)
    num_tokens, num_experts, k = 9, 8, 3
    logits_TE = torch.randn(num_tokens, num_experts)
    bias_E = torch.randn(num_experts) * 0.5
    rule = SigmoidBias(k=k, num_groups=num_groups, topk_groups=topk_groups, routed_scaling=2.5, seq_aux_coef=0.1)
    routes = rule.route(logits_TE, bias_E)
    want = []
    size = num_experts // num_groups
    for t in range(num_tokens):
        scores = torch.sigmoid(logits_TE[t].double()).tolist()
        select = [s + b for s, b in zip(scores, bias_E.tolist())]
        group_score = [sum(sorted(select[g * size : (g + 1) * size])[-2:]) for g in range(num_groups)]
        groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for e in range(num_experts) if e // size in groups]
        best = sorted(allowed, key=lambda e: -select[e])[:k]
        total = sum(scores[e] for e in best)
        want += [(t, e, 2.5 * scores[e] / total) for e in best]
    _assert_same_table(_as_table(routes), sorted(want))
    counts = torch.bincount(torch.tensor([e for _, e, _ in want]), minlength=num_experts).double()
    scores_TE = torch.sigmoid(logits_TE.double())
    mean_share = (scores_TE / scores_TE.sum(1, keepdim=True)).mean(0)
    aux = 0.1 * (counts * num_experts / (k * num_tokens) * mean_share).sum()
    assert_close(routes.aux_loss.double(), aux, rtol=1e-5, atol=1e-7)


def test_sigmoid_bias_selects_but_does_not_weight():
    logits_TE = torch.zeros(1, 4)
    bias_E = torch.tensor([0.0, 0.0, 0.0, 1.0])
    routes = SigmoidBias(k=1).route(logits_TE, bias_E)
    assert routes.expert_ids_P.tolist() == [3]
    assert_close(routes.weights_P, torch.ones(1))  # normalised plain score, bias not included


def test_bias_update_moves_towards_underloaded_experts():
    bias_E = torch.zeros(4)
    SigmoidBias(bias_update_rate=0.01).update_bias(bias_E, torch.tensor([10, 2, 4, 4]))
    assert_close(bias_E, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_restore_sums_weighted_copies():
    y_PD = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    out = restore(y_PD, torch.tensor([0.5, 0.25, 1.0]), torch.tensor([1, 1, 0]), 3)
    assert_close(out, torch.tensor([[4.0, 4.0], [1.0, 1.0], [0.0, 0.0]]))


def _mixtral_block(hidden, inter, experts, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=k
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return block


@pytest.mark.parametrize("num_chunks", [1, 3])
def test_layer_equals_mixtral_block(num_chunks):
    torch.manual_seed(6)
    block = _mixtral_block(16, 24, 4, 2)
    layer = MoELayer(MoELayerConfig(hidden_size=16, expert_hidden_size=24, num_experts=4, num_chunks=num_chunks))
    layer.load_state_dict(block.state_dict())
    x_ref = torch.randn(2, 7, 16, requires_grad=True)
    x_ours = x_ref.detach().clone().requires_grad_(True)
    y_ref, y_ours = block(x_ref), layer(x_ours)
    assert_close(y_ours, y_ref)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_ours * g).sum().backward()
    assert_close(x_ours.grad, x_ref.grad)
    assert_close(layer.gate.weight.grad, block.gate.weight.grad)
    assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad)
    assert_close(layer.experts.down_proj.grad, block.experts.down_proj.grad)


@pytest.mark.parametrize(
    "routing",
    [TopKSoftmax(k=2, capacity_factor=1.0), SwitchTop1(), ExpertChoice(capacity_factor=1.0), SigmoidBias(k=2)],
    ids=["topk-capacity", "switch", "expert-choice", "sigmoid-bias"],
)
def test_chunked_equals_unchunked_single_process(routing):
    torch.manual_seed(7)
    config = MoELayerConfig(hidden_size=8, expert_hidden_size=12, num_experts=4, routing=routing, init_std=0.3)
    x = torch.randn(10, 8)
    results = []
    for num_chunks in (1, 4, 16):  # 16 > T: some chunks are empty
        torch.manual_seed(8)
        layer = MoELayer(dataclasses.replace(config, num_chunks=num_chunks))
        x_in = x.clone().requires_grad_(True)
        (layer(x_in).square().sum() + layer.aux_loss).backward()
        results.append((layer(x).detach(), x_in.grad, [p.grad for p in layer.parameters()]))
    for y, gx, grads in results[1:]:
        assert_close(y, results[0][0])
        assert_close(gx, results[0][1])
        for got, want in zip(grads, results[0][2]):
            assert_close(got, want)


def test_fit_linear_recovers_line():
    fit = fit_linear([1e6, 2e6, 4e6], [0.003, 0.005, 0.009])
    assert fit.fixed_s == pytest.approx(0.001)
    assert fit.per_byte_s == pytest.approx(2e-9)


def test_simulated_pipeline():
    assert simulate_phase(1, comm_s=1.0, compute_s=2.0) == pytest.approx(4.0)  # x, compute, y in series
    # d=2, each piece half: x0 (0.5) | x1 on the wire while compute0 | ... = 0.5 + 1 + 1 + 0.5
    assert simulate_phase(2, comm_s=0.5, compute_s=1.0) == pytest.approx(3.0)


def test_choose_num_chunks_follows_costs():
    def profile(comm_fixed_s):
        return SplitProfile(
            num_bytes=8_000_000,
            all_to_all=LinearFit(fixed_s=comm_fixed_s, per_byte_s=1e-7),  # 0.8 s for everything
            expert_forward=LinearFit(fixed_s=0.0, per_byte_s=1e-7),
            expert_backward=LinearFit(fixed_s=0.0, per_byte_s=2e-7),
        )

    assert choose_num_chunks(profile(0.0), max_chunks=8).num_chunks >= 6  # no latency: split finely
    assert choose_num_chunks(profile(10.0), max_chunks=8).num_chunks == 1  # huge latency: never split
    middle = choose_num_chunks(profile(0.05), max_chunks=8)
    assert 1 < middle.num_chunks < 8
    assert middle.predicted_step_s[middle.num_chunks] < middle.predicted_step_s[1]


@pytest.mark.parametrize("input_needs_grad,experts_trainable", [(False, True), (True, False)])
def test_partial_gradients(input_needs_grad, experts_trainable):
    """An input without grad (first layer) skips the input backward; frozen experts get no grad;
    whatever is computed equals the fully differentiated layer's."""
    torch.manual_seed(9)
    config = MoELayerConfig(hidden_size=8, expert_hidden_size=12, num_experts=4, num_chunks=2, init_std=0.3)
    full, partial = MoELayer(config), MoELayer(config)
    partial.load_state_dict(full.state_dict())
    partial.experts.requires_grad_(experts_trainable)
    x = torch.randn(9, 8)
    x_full, x_partial = x.clone().requires_grad_(True), x.clone().requires_grad_(input_needs_grad)
    full(x_full).square().sum().backward()
    partial(x_partial).square().sum().backward()
    assert_close(partial.gate.weight.grad, full.gate.weight.grad)
    assert (x_partial.grad is not None) == input_needs_grad
    if input_needs_grad:
        assert_close(x_partial.grad, x_full.grad)
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(partial.experts, name).grad
        if experts_trainable:
            assert_close(got, getattr(full.experts, name).grad)
        else:
            assert got is None


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 1], [4, 4, 4]], ids=["empty-middle", "one-row", "even"])
def test_expert_mlp_paths_match_reference(monkeypatch, grouped, counts):
    import moeflow.kernels.backend as backend
    import moeflow.training.experts as experts

    if not grouped:
        monkeypatch.setattr(backend, "grouped_mm_fits", lambda *args: False)
    elif not backend.grouped_mm_fits(torch.zeros(3, 24, 8), torch.zeros(3, 8, 12)):
        pytest.skip("this torch has no CPU grouped_mm")
    torch.manual_seed(10)
    x_ND = torch.randn(sum(counts), 8, requires_grad=True)
    gate_up = torch.randn(3, 24, 8, requires_grad=True)
    down = torch.randn(3, 8, 12, requires_grad=True)
    y = experts.expert_mlp_torch(x_ND, counts, gate_up, down)
    rows = []
    for n, e in enumerate([e for e, c in enumerate(counts) for _ in range(c)]):
        h = gate_up[e] @ x_ND[n]
        rows.append(down[e] @ (torch.nn.functional.silu(h[:12]) * h[12:]))
    want = torch.stack(rows)
    assert_close(y, want)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad((y * g).sum(), (x_ND, gate_up, down))
    want_grads = torch.autograd.grad((want * g).sum(), (x_ND, gate_up, down))
    for got, expected in zip(got_grads, want_grads):
        assert_close(got, expected)


def test_kernels_backend_equals_torch_backend():
    """The kernels package's fused MoE (Triton, through the interpreter here) as the layer's expert
    compute: same outputs and gradients as the torch path, chunked."""
    pytest.importorskip("moeflow.kernels.fused_moe", reason="the kernels package provides the fused expert MLP")
    torch.manual_seed(11)
    config = MoELayerConfig(hidden_size=16, expert_hidden_size=16, num_experts=4, num_chunks=2, init_std=0.3)
    results = []
    for backend in ("torch", "kernels"):
        torch.manual_seed(12)
        layer = MoELayer(dataclasses.replace(config, expert_backend=backend))
        x = torch.randn(6, 16, requires_grad=True)
        layer(x).square().sum().backward()
        results.append((layer(x).detach(), x.grad, [p.grad for p in layer.parameters()]))
    (y_torch, gx_torch, grads_torch), (y_kernels, gx_kernels, grads_kernels) = results
    assert_close(y_kernels, y_torch)
    assert_close(gx_kernels, gx_torch)
    for got, want in zip(grads_kernels, grads_torch):
        assert_close(got, want)
