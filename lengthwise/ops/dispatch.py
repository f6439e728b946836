"""Which backend runs an op: the torch reference, or the Triton kernels in `lengthwise.ops.triton`.

`LENGTHWISE_KERNELS` chooses, read at every call so a test or an A/B run can flip it:

- unset or `auto`: Triton when the tensor is on CUDA and triton imports, else the torch reference;
- `torch`: the torch reference everywhere (the A/B baseline);
- `triton`: Triton on any device (on the CPU only under `TRITON_INTERPRET=1`, for tests).
"""

from __future__ import annotations

import os
from functools import cache

import torch

KERNELS_ENV = "LENGTHWISE_KERNELS"
_CHOICES = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    """Whether triton imports here (it is optional: the torch reference needs nothing beyond torch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a triton build that cannot load on this machine
        return False
    return True


def kernel_choice() -> str:
    """The value of `LENGTHWISE_KERNELS` (`auto`, `torch` or `triton`); raises `ValueError` on others."""
    choice = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def use_triton(x: torch.Tensor) -> bool:
    """Whether the op about to run on `x` should take its Triton kernel."""
    return triton_runs_on(x.device)


def triton_runs_on(device: torch.device) -> bool:
    """Whether ops on tensors on `device` take their Triton kernels (see the module docstring)."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    if choice == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise ValueError(f"{KERNELS_ENV}=triton, but triton does not import")
    return True
