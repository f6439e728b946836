"""SiLU-and-multiply over the fused gate-up projection, `[T, 2I] -> [T, I]` in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # torch rounds silu(gate) to the activation dtype before the multiply; so does this.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, act * up, mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate then up), got {two_i}")
    inter = two_i // 2
    x = gate_up.reshape(-1, two_i)
    if x.stride(-1) != 1:
        x = x.contiguous()
    shape = (*gate_up.shape[:-1], inter)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != shape or out.dtype != gate_up.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {gate_up.dtype} tensor shaped {list(shape)}")
    rows = x.shape[0]
    if rows == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    if rows * triton.cdiv(inter, block) < 256:  # few rows (decode): more, smaller programs
        block = max(min(block, 256), 16)
    grid = (rows, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), inter, inter, BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out
