"""Where a kernel call runs: Triton (GPU, or the Triton interpreter on a CPU) or plain torch; and whether
torch's ``grouped_mm`` can take an expert weight pool.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted
(``triton.knobs.runtime.interpret``, read from ``TRITON_INTERPRET``); we read the same knob once, at
import, so the choice here always agrees with how the kernels were defined.
"""

from __future__ import annotations

import torch
from triton import knobs

INTERPRETING: bool = bool(knobs.runtime.interpret)

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors go to the Triton kernels: they are on a GPU, or the interpreter is on."""
    return INTERPRETING or all(t.is_cuda for t in tensors)


def device_key(device: torch.device) -> str:
    """The name tuned configs are stored under: the GPU's name, or ``interpreter`` / ``cpu``."""
    if device.type == "cuda" and not INTERPRETING:
        return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return "interpreter" if INTERPRETING else "cpu"


def grouped_mm_fits(gate_up_S2ID: torch.Tensor, down_SDI: torch.Tensor) -> bool:
    """True when ``F.grouped_mm`` takes these weights and the activations between its two calls.

    The one rule of the project (the CPU plan, the exact path, the tuner): fp32/bf16/fp16 (else
    "Expected mat_a to be Float32, BFloat16 or Float16"); every tensor 16-byte aligned with every
    non-unit stride a multiple of 16 bytes (else "strides should be multiple of 16 bytes"), which for
    the gathered rows [n, D] and the activations [n, I] means D and I rows of a multiple of 16 bytes
    (fp32: D, I multiples of 4; bf16/fp16: of 8); on a GPU, compute capability 8.0 or newer.
    """
    if gate_up_S2ID.dtype not in GROUPED_MM_DTYPES:
        return False
    if gate_up_S2ID.is_cuda and torch.cuda.get_device_capability(gate_up_S2ID.device) < (8, 0):
        return False
    size = gate_up_S2ID.element_size()
    _, D, I = down_SDI.shape
    if (D * size) % 16 or (I * size) % 16:
        return False
    for t in (gate_up_S2ID, down_SDI):
        if t.data_ptr() % 16 or any(st != 1 and (st * size) % 16 for st in t.stride()):
            return False
    return True
