"""Expert compute: the SwiGLU expert MLP over rows already grouped by expert.

Weights follow transformers' fused layout so a Mixtral's experts load as they are:
`gate_up_proj [E, 2I, D]` (gate rows first, then up rows) and `down_proj [E, D, I]`,
y = down @ (silu(gate @ x) * (up @ x)).

On a GPU the kernels package's fused MoE (Triton, with its own backward) is used when it exists;
everywhere else, a torch path (one matmul pair per expert, autograd for the backward).

Legend: N rows (token copies received by this rank), D hidden, I expert hidden, L experts on this rank.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ExpertBackend = Literal["auto", "torch", "kernels"]


def _grouped_mm_fits(x_ND: Tensor, gate_up_E2ID: Tensor, down_EDI: Tensor) -> bool:
    """torch's grouped_mm takes fp32/bf16/fp16 with rows aligned to 16 bytes; no rows is not allowed."""
    if not hasattr(F, "grouped_mm") or x_ND.device.type != "cpu" or x_ND.shape[0] == 0:
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all((n * x_ND.element_size()) % 16 == 0 for n in (down_EDI.shape[1], down_EDI.shape[2]))


def expert_mlp_torch(
    x_ND: Tensor, tokens_per_expert_E: Sequence[int], gate_up_E2ID: Tensor, down_EDI: Tensor
) -> Tensor:
    """Rows of `x_ND` sorted by expert, `tokens_per_expert_E[l]` of them for expert l.

    grouped_mm (one call per projection, weight gradients produced in place as [L, ...]) where its
    constraints hold; otherwise a loop over experts. Either way autograd gives the backward.
    """
    if _grouped_mm_fits(x_ND, gate_up_E2ID, down_EDI):
        ends_L = torch.tensor(list(tokens_per_expert_E), device=x_ND.device).cumsum(0).to(torch.int32)
        gate_up_N2I = F.grouped_mm(x_ND, gate_up_E2ID.transpose(1, 2), offs=ends_L)
        gate_NI, up_NI = gate_up_N2I.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate_NI) * up_NI, down_EDI.transpose(1, 2), offs=ends_L)
    outputs = []
    # unbind, not gate_up_E2ID[e]: the backward of L selects would zero-fill L full-size gradients
    # (a 4x slower expert backward at L=8); unbind's backward is one stack.
    gate_up_2ID, down_DI = gate_up_E2ID.unbind(0), down_EDI.unbind(0)
    for expert, x_nD in enumerate(torch.split(x_ND, list(tokens_per_expert_E))):
        if x_nD.shape[0] == 0:
            continue
        gate_nI, up_nI = F.linear(x_nD, gate_up_2ID[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate_nI) * up_nI, down_DI[expert]))
    if not outputs:
        return x_ND.new_zeros(0, down_EDI.shape[1])
    return torch.cat(outputs)


def _fused_moe_kernel() -> Callable[..., Tensor] | None:
    try:
        kernels = importlib.import_module("moeflow.kernels")
    except ImportError:
        return None
    return getattr(kernels, "fused_moe", None)


def expert_mlp_kernels(
    x_ND: Tensor, tokens_per_expert_E: Sequence[int], gate_up_E2ID: Tensor, down_EDI: Tensor
) -> Tensor:
    """The same computation through `kernels.fused_moe` with one expert per row and weight 1."""
    fused_moe = _fused_moe_kernel()
    if fused_moe is None:
        raise ValueError("kernels.fused_moe is not available; use expert_backend='torch'")
    counts_E = torch.tensor(list(tokens_per_expert_E), device=x_ND.device)
    expert_ids_N1 = torch.repeat_interleave(torch.arange(len(counts_E), device=x_ND.device), counts_E)[:, None]
    weights_N1 = x_ND.new_ones(x_ND.shape[0], 1)
    return fused_moe(x_ND, gate_up_E2ID, down_EDI, weights_N1, expert_ids_N1)


ExpertFn = Callable[[Tensor, Sequence[int], Tensor, Tensor], Tensor]


def select_expert_fn(backend: ExpertBackend, device: torch.device) -> ExpertFn:
    """'auto' takes the fused kernel on CUDA when the kernels package provides it, else torch."""
    if backend == "torch":
        return expert_mlp_torch
    if backend == "kernels":
        return expert_mlp_kernels
    if device.type == "cuda" and _fused_moe_kernel() is not None:
        return expert_mlp_kernels
    return expert_mlp_torch
