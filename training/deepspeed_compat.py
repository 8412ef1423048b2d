"""DeepSpeed integration: the MoE layer inside `deepspeed.initialize` (ZeRO 1 and 2), and
DeepSpeed-MoE (`deepspeed.moe.layer.MoE`) built to the same sizes as the baseline it is measured against.

DeepSpeed treats a parameter as an expert parameter when `param.allreduce is False`, reduces it in
its expert-data-parallel group named by `param.group_name`, and only switches its MoE handling on
when the model contains a `deepspeed.moe.layer.MoE`. `prepare_for_deepspeed` marks our expert
parameters, registers one parameter-free marker per layer (a `MoE` subclass that only creates
DeepSpeed's expert groups) and returns the optimizer parameter groups DeepSpeed expects.

Checkpointing through DeepSpeed's MoE checkpoint format is not covered: save `model.state_dict()`
per rank instead.

Shapes: the project legend (moeflow/__init__.py).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from moeflow.training.lm import moe_layers
from moeflow.training.moe_layer import MoELayerConfig
from torch import Tensor, nn


def prepare_extension_dir(*, stale_after_s: float = 600.0) -> Path:
    """Point torch's JIT extension builds (DeepSpeed builds its CPU shared-memory op on first
    `init_distributed`) at a folder inside this Python environment, unless TORCH_EXTENSIONS_DIR is
    already set, and remove build locks older than `stale_after_s`. torch waits forever on a lock
    left by a process killed mid-build; the build itself takes ~25 s here. Call it before
    `deepspeed.init_distributed`, in the launcher or in each rank (it is idempotent)."""
    folder = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "var", "torch_extensions")))
    now = time.time()
    for lock in folder.glob("*/lock"):
        try:
            age_s = now - lock.stat().st_mtime
            if age_s > stale_after_s:
                lock.unlink()
                warnings.warn(f"removed a stale extension build lock ({age_s:.0f} s old): {lock}", stacklevel=2)
        except FileNotFoundError:  # another rank removed it or its build finished
            pass
    return folder


class DeepSpeedMoEMarker(MoE):
    """Tells the DeepSpeed engine that the model has MoE layers of `num_experts` experts split over
    `ep_size` ranks. Holds no parameters and is never called."""

    def __init__(self, *, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("DeepSpeedMoEMarker only marks a moeflow MoELayer; it has no forward")


def prepare_for_deepspeed(model: nn.Module, *, param_group: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Mark the expert parameters for DeepSpeed and return optimizer parameter groups (pass them to
    your optimizer, or as `model_parameters` to `deepspeed.initialize`). Expert parallelism must
    span all ranks (each expert on exactly one rank)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoELayer; apply training.lm.apply_expert_parallel first")
    world = dist.get_world_size() if dist.is_initialized() else 1
    for layer in layers:
        ep_size = layer.comm.world_size
        if ep_size != world:
            raise ValueError(
                f"a MoELayer spans {ep_size} of {world} ranks; with DeepSpeed build it over all ranks "
                "(expert-data parallelism is not supported yet)"
            )
        marker = DeepSpeedMoEMarker(num_experts=layer.config.num_experts, ep_size=ep_size)
        layer.add_module("deepspeed_marker", marker)
        for param in layer.expert_parameters():
            param.allreduce = False
            param.group_name = marker.expert_group_name
    base = {"name": "dense", **(param_group or {}), "params": list(model.parameters())}
    return split_params_into_different_moe_groups_for_optimizer(base)


class SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed-MoE with the same maths and sizes as ours."""

    def __init__(self, hidden_size: int, expert_hidden_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * expert_hidden_size, bias=False)
        self.down = nn.Linear(expert_hidden_size, hidden_size, bias=False)

    def forward(self, x_TD: Tensor) -> Tensor:
        gate_TI, up_TI = self.gate_up(x_TD).chunk(2, dim=-1)
        return self.down(F.silu(gate_TI) * up_TI)


def deepspeed_moe_baseline(config: MoELayerConfig, *, ep_size: int, k: int = 2, capacity_factor: float = 1.0) -> MoE:
    """DeepSpeed-MoE with SwiGLU experts of `config`'s sizes, top-k gating with capacity factor.
    Call `set_deepspeed_parallelism()` on it when not using `deepspeed.initialize`."""
    return MoE(
        hidden_size=config.hidden_size,
        expert=SwiGLUExpert(config.hidden_size, config.expert_hidden_size),
        num_experts=config.num_experts,
        ep_size=ep_size,
        k=k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        drop_tokens=True,
    )
