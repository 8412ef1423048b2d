"""The dumbest correct fused MoE: one (token, k) pair at a time, in fp32. Tests compare against it.

Shape letters: the legend in moeflow/__init__.py (T tokens, D hidden, I expert intermediate, K top-k,
E experts or pool slots).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def fused_moe_reference(
    hidden_TD: torch.Tensor,
    gate_up_proj_E2ID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t,k] if 0 <= e < E.

    ``gate``, when given, replaces SiLU-and-mul: it maps the gate/up product [1, 2I] to [1, I].
    Computed in fp32 from the inputs (upcast), returned in hidden's dtype; differentiable.
    """
    T, D = hidden_TD.shape
    E, I2, _ = gate_up_proj_E2ID.shape
    I = I2 // 2
    ids = topk_ids_TK.tolist()
    rows = []
    for t in range(T):
        acc_D = torch.zeros(D, dtype=torch.float32, device=hidden_TD.device)
        for k, e in enumerate(ids[t]):
            if not 0 <= e < E:
                continue
            h_2I = gate_up_proj_E2ID[e].float() @ hidden_TD[t].float()
            a_I = F.silu(h_2I[:I]) * h_2I[I:] if gate is None else gate(h_2I[None])[0]
            acc_D = acc_D + topk_weights_TK[t, k].float() * (down_proj_EDI[e].float() @ a_I)
        rows.append(acc_D)
    if not rows:
        return hidden_TD.new_zeros(0, D)
    return torch.stack(rows).to(hidden_TD.dtype)
