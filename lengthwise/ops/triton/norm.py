"""RMSNorm fused with the residual add: one read of x and residual, one write of each output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, x_stride, r_stride, out_stride, sum_stride,
                     n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype: it is the next residual and what is normalised.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / n + eps)
    # As the reference: normalise in float32, cast to the activation dtype, then multiply the weight.
    y = (h * rstd).to(x.dtype).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {list(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be shaped like x {list(x.shape)}, got {list(residual.shape)}")
    x2 = _rows(x, n)
    rows = x2.shape[0]
    total = x if residual is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                                                   device=x.device)
    out_dtype = torch.promote_types(weight.dtype, total.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor shaped {list(x.shape)}")
    if rows == 0:
        return out, total
    r2 = x2 if residual is None else _rows(residual, n)
    s2 = x2 if residual is None else total.view(-1, n)
    block = triton.next_power_of_2(n)
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    _rms_norm_kernel[(rows,)](x2, r2, weight, out.view(-1, n), s2, x2.stride(0), r2.stride(0), n, s2.stride(0),
                              n, float(eps), HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    return out, total
