"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.dispatch import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(norm(x + residual) * weight, x + residual)`.

    The sum is kept in the activation dtype and becomes the next residual, as in transformers;
    the normalisation itself is computed in float32 and cast back before the weight multiply,
    which is what makes bf16/fp16 outputs match the reference implementation.
    """
    if use_triton(x):
        return triton_ops.fused_add_rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x
