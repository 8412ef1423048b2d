"""The MoE layer inside `deepspeed.initialize` with ZeRO 1 and 2 (2 gloo ranks) trains exactly like
the single-process layer: DeepSpeed must reduce expert gradients per rank (never average different
experts together) and average the rest, and its steps must move the sigmoid router's balancing bias
as the single-process steps do (the hook of `update_routing_bias_every_step` on the wrapped optimizer)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from moeflow.training.launch import run_ranks
from moeflow.training.lm import update_routing_bias_every_step
from moeflow.training.moe_layer import MoELayer, MoELayerConfig
from moeflow.training.routing import SigmoidBias
from torch import nn
from torch.testing import assert_close

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency (pip install -e .[dev])")

STEPS, TOKENS = 3, 6
CONFIG = MoELayerConfig(
    hidden_size=8,
    expert_hidden_size=12,
    num_experts=4,
    routing=SigmoidBias(k=2, bias_update_rate=0.05, seq_aux_coef=0.01),
    num_chunks=2,
    init_std=0.3,
)


def _model(group):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 8), MoELayer(CONFIG))
    if group is None:
        return reference
    model = nn.Sequential(nn.Linear(8, 8), MoELayer(CONFIG, group))
    model[0].load_state_dict(reference[0].state_dict())
    model[1].gate.load_state_dict(reference[1].gate.state_dict())
    model[1].load_full_experts(reference[1].experts.gate_up_proj.data, reference[1].experts.down_proj.data)
    return model


def deepspeed_worker(rank: int, world: int, stages: list[int]) -> None:
    import deepspeed
    from moeflow.training.deepspeed_compat import prepare_extension_dir, prepare_for_deepspeed

    prepare_extension_dir()

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(1)
    inputs = torch.randn(STEPS, world, TOKENS, 8)

    reference = _model(None)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    update_routing_bias_every_step(reference, ref_optimizer)
    for step in range(STEPS):
        ref_optimizer.zero_grad()
        for r in range(world):
            ((reference(inputs[step, r]).square().mean() + reference[1].aux_loss) / world).backward()
        ref_optimizer.step()

    for stage in stages:
        model = _model(dist.group.WORLD)
        optimizer = torch.optim.SGD(prepare_for_deepspeed(model), lr=0.5)
        update_routing_bias_every_step(model, optimizer)
        ds_config = {
            "train_micro_batch_size_per_gpu": TOKENS,
            "train_batch_size": TOKENS * world,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        for step in range(STEPS):
            loss = engine(inputs[step, rank]).square().mean() + model[1].aux_loss
            engine.backward(loss)
            engine.step()
        local = slice(rank * 4 // world, (rank + 1) * 4 // world)
        for name, value in model.state_dict().items():
            want = reference.state_dict()[name]
            start = initial[name]
            if ".experts." in name:
                want, start = want[local], start[local]
            assert_close(value, want, msg=lambda m, name=name, stage=stage: f"ZeRO {stage}, {name}: {m}")
            assert not torch.equal(value, start), f"{name} did not train under ZeRO {stage}"


def test_extension_dir_is_private_and_stale_build_locks_are_removed(tmp_path, monkeypatch):
    from moeflow.training.deepspeed_compat import prepare_extension_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "old_op" / "lock", tmp_path / "new_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with pytest.warns(UserWarning, match="stale extension build lock"):
        assert prepare_extension_dir(stale_after_s=600) == tmp_path
    assert not stale.exists() and fresh.exists()  # a lock younger than a build may be a live build

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    folder = prepare_extension_dir()
    assert folder.is_relative_to(sys.prefix)  # one per environment: a fresh clone never meets an old lock
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(folder)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_layer_trains_inside_deepspeed_zero_1_and_2():
    run_ranks(deepspeed_worker, 2, args=[1, 2], timeout_s=300)
