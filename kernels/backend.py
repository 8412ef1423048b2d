"""Where a kernel call runs: Triton (GPU, or the Triton interpreter on a CPU) or plain torch on the CPU.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted
(``triton.knobs.runtime.interpret``, read from ``TRITON_INTERPRET``); we read the same knob once, at
import, so the dispatch here always agrees with how the kernels were defined.
"""

from __future__ import annotations

import torch
from triton import knobs

INTERPRETING: bool = bool(knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors go to the Triton kernels: they are on a GPU, or the interpreter is on."""
    return INTERPRETING or all(t.is_cuda for t in tensors)


def device_key(device: torch.device) -> str:
    """The name tuned configs are stored under: the GPU's name, or ``interpreter`` / ``cpu``."""
    if device.type == "cuda" and not INTERPRETING:
        return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return "interpreter" if INTERPRETING else "cpu"
