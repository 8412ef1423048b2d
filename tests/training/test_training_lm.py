"""A Mixtral LM with its MoE blocks replaced by the expert-parallel layer trains like the
single-process run: same per-step loss and same weights after a few steps (2 gloo ranks,
bucketed gradient averaging, chunked all-to-all). With DeepSeek-V3's sigmoid router, the training
step moves the balancing bias and the load evens out."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from moeflow.training.grad_buckets import BucketConfig, GradBucketReducer
from moeflow.training.launch import run_ranks
from moeflow.training.lm import (
    apply_expert_parallel,
    expert_parameters,
    moe_aux_loss,
    moe_layers,
    replicated_parameters,
    update_routing_bias_every_step,
)
from moeflow.training.routing import SigmoidBias
from torch.testing import assert_close

STEPS, BATCH, SEQ, VOCAB = 4, 2, 8, 64


def _tiny_mixtral(num_experts: int = 4, max_positions: int = SEQ):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        max_position_embeddings=max_positions,
        router_aux_loss_coef=0.02,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss + moe_aux_loss(model)


def lm_worker(rank: int, world: int, args: None) -> dict[str, object]:
    torch.manual_seed(1)
    starts = torch.randint(0, VOCAB, (STEPS, world, BATCH, 1))
    batches = (starts + torch.arange(SEQ)) % VOCAB  # counting sequences: learnable in a few steps

    plain = _tiny_mixtral()  # transformers' own model, for the first loss
    with torch.no_grad():
        plain_loss = plain(input_ids=batches[0, rank], labels=batches[0, rank]).loss

    model = _tiny_mixtral()
    layers = apply_expert_parallel(model, dist.group.WORLD, num_chunks=2)
    assert len(layers) == 2 and all(layer.comm.num_local_experts == 4 // world for layer in layers)
    reducer = GradBucketReducer(
        replicated_parameters(model),
        group=dist.group.WORLD,
        expert_params=expert_parameters(model),
        config=BucketConfig(bucket_bytes=4096),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # scale-sensitive, unlike Adam
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = _loss(model, batches[step, rank])
        if step == 0:
            with torch.no_grad():
                first_lm_loss = model(input_ids=batches[0, rank], labels=batches[0, rank]).loss
        loss.backward()
        # Every bucket's all-reduce was started by the backward itself, none is left for finish().
        assert reducer.launched_buckets == reducer.num_buckets > 1
        reducer.finish()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)

    reference = _tiny_mixtral()
    apply_expert_parallel(reference, None)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    ref_losses = []
    for step in range(STEPS):
        ref_optimizer.zero_grad()
        total = 0.0
        for r in range(world):  # the same batches, one after the other, mean loss
            loss = _loss(reference, batches[step, r]) / world
            loss.backward()
            total += float(loss)
        ref_optimizer.step()
        ref_losses.append(total)

    assert_close(first_lm_loss, plain_loss)  # the pass did not change the model's function
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # it trains
    ours, theirs = model.state_dict(), reference.state_dict()
    for name, value in ours.items():
        if ".experts." in name:  # this rank holds its slice of the reference's experts
            layer = moe_layers(model)[0]
            local = slice(rank * layer.comm.num_local_experts, (rank + 1) * layer.comm.num_local_experts)
            assert_close(value, theirs[name][local], rtol=1e-4, atol=1e-5)
        else:
            assert_close(value, theirs[name], rtol=1e-4, atol=1e-5)
    return {"losses": losses}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_lm_training_matches_single_process():
    results = run_ranks(lm_worker, 2, timeout_s=300)
    assert results[0]["losses"] == results[1]["losses"]


def _late_imbalance(*, balance: bool, steps: int = 24, late: int = 10) -> tuple[list[float], list[float]]:
    """Train a tiny 8-expert LM with DeepSeek-V3's sigmoid router (with or without the bias hook) on one
    batch; per layer, the busiest expert's load over the mean load (1.0: balanced) at the first step and
    averaged over the last `late` steps."""
    model = _tiny_mixtral(num_experts=8, max_positions=32)
    layers = apply_expert_parallel(model, None, routing=SigmoidBias(k=2, bias_update_rate=0.02))
    torch.manual_seed(2)
    for layer in layers:  # a router that starts clearly unbalanced on this batch
        layer.gate.weight.data.normal_(std=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if balance:
        update_routing_bias_every_step(model, optimizer)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    imbalance_NL = []
    for _ in range(steps):
        before_LE = torch.stack([layer.load_E.clone() for layer in layers])
        loss = model(input_ids=ids, labels=ids).loss + moe_aux_loss(model)
        step_load_LE = torch.stack([layer.load_E for layer in layers]) - before_LE
        assert (step_load_LE.sum(dim=1) == ids.numel() * 2).all()
        imbalance_NL.append((step_load_LE.max(dim=1).values / step_load_LE.float().mean(dim=1)).tolist())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if balance:
        assert all(layer.gate.e_score_correction_bias.abs().sum() > 0 for layer in layers)
        assert all(int(layer.load_E.sum()) == 0 for layer in layers)  # the step's end reset the counters
    late_L = torch.tensor(imbalance_NL[-late:]).mean(dim=0).tolist()
    return imbalance_NL[0], late_L


def test_training_step_moves_the_sigmoid_bias_towards_balanced_load():
    first, balanced = _late_imbalance(balance=True)
    first_control, unbalanced = _late_imbalance(balance=False)
    assert first == first_control and min(first) > 1.25  # same start, clearly unbalanced
    for layer, (ours, control) in enumerate(zip(balanced, unbalanced)):
        assert ours < 0.85 * control and ours < 1.3, (layer, ours, control)
