"""Triton kernels behind the ops' dispatch (CUDA; on the CPU under `TRITON_INTERPRET=1` for tests).

Importing this package does not import triton: each function imports its kernel module on first
call, so the package loads where triton is absent. `lengthwise.ops.dispatch` decides when these run;
called directly they always take the Triton path.
"""

from __future__ import annotations

import torch

# Float8 KV caches the Triton kernels read and write besides the activations' dtype.
FP8_CACHES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if k_cache.dtype != q.dtype and k_cache.dtype not in FP8_CACHES:
        raise ValueError(f"the Triton kernels read a KV cache in the activations' dtype ({q.dtype}) or in "
                         f"float8, got a {k_cache.dtype} cache: use kv_cache_dtype 'auto' or 'fp8' where they run")


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` in one kernel: `(norm(x + residual) * weight, x + residual)`."""
    from lengthwise.ops.triton.norm import fused_add_rms_norm as run

    return run(x, weight, eps, residual, out)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up [..., 2 * I]`, gate first."""
    from lengthwise.ops.triton.activation import silu_and_mul as run

    return run(gate_up, out)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k, k and v stored straight into the paged cache; returns the rotated q."""
    _check_cache(q, k_cache)
    from lengthwise.ops.triton.rotary import rotary_and_write_kv as run

    return run(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **knobs) -> torch.Tensor:
    """`F.linear` for a single row `x [1, K]` (batch-1 decode)."""
    from lengthwise.ops.triton.linear import gemv as run

    return run(x, weight, bias, **knobs)


def int4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                **knobs) -> torch.Tensor:
    """`F.linear` with a 4-bit weight (`lengthwise.ops.int4.PackedInt4`), dequantized in registers."""
    from lengthwise.ops.triton.int4 import int4_linear as run

    return run(x, weight, bias, out, **knobs)


def norm_qkv_rotary_write(x, residual, norm_weight, eps, weight, bias, cos, sin, k_cache, v_cache, slot_mapping,
                          out=None, **knobs):
    """One token: residual add + RMSNorm + QKV GEMV + RoPE + KV write in one kernel; returns (q, residual)."""
    _check_cache(x, k_cache)
    from lengthwise.ops.triton.fused import norm_qkv_rotary_write as run

    return run(x, residual, norm_weight, eps, weight, bias, cos, sin, k_cache, v_cache, slot_mapping, out, **knobs)


def norm_gate_up_silu(x, residual, norm_weight, eps, weight, bias, out=None, **knobs):
    """One token: residual add + RMSNorm + gate-up GEMV + SiLU-and-mul in one kernel; returns (act, residual)."""
    from lengthwise.ops.triton.fused import norm_gate_up_silu as run

    return run(x, residual, norm_weight, eps, weight, bias, out, **knobs)


def paged_attention(q, k_cache, v_cache, positions, meta, scale, sliding_window=None, out=None):
    """Segment attention: the decode kernel when every row-group has one query, else the varlen one."""
    _check_cache(q, k_cache)
    from lengthwise.ops.triton.attention import paged_attention as run

    return run(q, k_cache, v_cache, positions, meta, scale, sliding_window, out)


__all__ = ["fused_add_rms_norm", "gemv", "int4_linear", "norm_gate_up_silu", "norm_qkv_rotary_write", "paged_attention",
           "rotary_and_write_kv", "silu_and_mul"]
