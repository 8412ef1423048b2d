"""Expert compute: the SwiGLU expert MLP over rows already grouped by expert.

Weights follow transformers' fused layout so a Mixtral's experts load as they are:
`gate_up_proj [X, 2I, D]` (gate rows first, then up rows) and `down_proj [X, D, I]`,
y = down @ (silu(gate @ x) * (up @ x)).

Both backends call `moeflow.kernels.experts_forward`, the project's one expert MLP, with one expert per
row (K=1) and weight 1: 'torch' its exact path (grouped_mm, or one matmul pair per expert where
grouped_mm cannot take the weights; autograd gives the backward), 'kernels' its fast path (the Triton
fused MoE with its own backward on a GPU, the measured fastest torch formulation on the CPU).

Shapes: the project legend (moeflow/__init__.py): N rows (token copies received by this rank), D hidden,
I expert intermediate, X experts held by this rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from moeflow.kernels import experts_forward
from torch import Tensor

ExpertBackend = Literal["auto", "torch", "kernels"]


def _grouped_rows(
    x_ND: Tensor, tokens_per_expert_X: Sequence[int], gate_up_X2ID: Tensor, down_XDI: Tensor, *, exact: bool
) -> Tensor:
    """Rows of `x_ND` sorted by expert, `tokens_per_expert_X[x]` of them for expert x, as K=1 pairs."""
    counts_X = torch.tensor(list(tokens_per_expert_X), device=x_ND.device)
    expert_ids_N1 = torch.repeat_interleave(torch.arange(len(counts_X), device=x_ND.device), counts_X)[:, None]
    weights_N1 = x_ND.new_ones(x_ND.shape[0], 1)
    return experts_forward(x_ND, gate_up_X2ID, down_XDI, weights_N1, expert_ids_N1, exact=exact)


def expert_mlp_torch(
    x_ND: Tensor, tokens_per_expert_X: Sequence[int], gate_up_X2ID: Tensor, down_XDI: Tensor
) -> Tensor:
    """`experts_forward`'s exact path: transformers' grouped_mm arithmetic, differentiated by autograd."""
    return _grouped_rows(x_ND, tokens_per_expert_X, gate_up_X2ID, down_XDI, exact=True)


def expert_mlp_kernels(
    x_ND: Tensor, tokens_per_expert_X: Sequence[int], gate_up_X2ID: Tensor, down_XDI: Tensor
) -> Tensor:
    """`experts_forward`'s fast path: `kernels.fused_moe`."""
    return _grouped_rows(x_ND, tokens_per_expert_X, gate_up_X2ID, down_XDI, exact=False)


ExpertFn = Callable[[Tensor, Sequence[int], Tensor, Tensor], Tensor]


def select_expert_fn(backend: ExpertBackend, device: torch.device) -> ExpertFn:
    """'auto' takes the fused Triton kernel on CUDA, else the exact torch path."""
    if backend == "torch":
        return expert_mlp_torch
    if backend == "kernels":
        return expert_mlp_kernels
    return expert_mlp_kernels if device.type == "cuda" else expert_mlp_torch
