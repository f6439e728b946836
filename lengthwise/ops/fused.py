"""The decoder layer's two fusable blocks as ops: what comes between the residual stream and the
attention, and between the residual stream and the down projection.

- `norm_qkv_rotary_write`: residual add + RMSNorm, QKV projection, (q/k norm,) RoPE, KV write;
- `norm_gate_up_silu`: residual add + RMSNorm, gate-up projection, SiLU-and-mul.

A single row (batch-1 decode) on the Triton path runs each as one kernel
(`lengthwise.ops.triton.fused`), which saves the launches of the elementwise ops between the
GEMVs; everything else, and models with q/k norms (whose per-head norm needs the whole head before
RoPE), runs the same ops one by one. `LENGTHWISE_FUSED=0` keeps single rows unfused (an A/B
switch; `LENGTHWISE_GEMV=0` turns off every Triton GEMV, these included).

A CPU model's weights may be packed (`lengthwise.ops.cpu.PackedWeight`; the gate-up projection as
a (gate, up) pair of them): `linear` runs those on the panel GEMM, and the Triton kernels get them
unpacked (only tests run Triton on the CPU).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lengthwise.ops import triton as triton_ops
from lengthwise.ops.activation import silu_and_mul
from lengthwise.ops.cpu import AnyWeight, dense
from lengthwise.ops.dispatch import use_triton
from lengthwise.ops.int4 import PackedInt4
from lengthwise.ops.linear import gemv_enabled, linear
from lengthwise.ops.lora import LayerLoRA
from lengthwise.ops.norm import rms_norm
from lengthwise.ops.rotary import rotary_and_write_kv

FUSED_ENV = "LENGTHWISE_FUSED"


def fused_single_row(x: torch.Tensor, weight: AnyWeight | PackedInt4) -> bool:
    """Whether `x` is one row that takes the fused single-row kernels with `weight` (they read dense
    weights: a 4-bit one runs op by op, on the W4A16 kernel)."""
    return (x.dim() == 2 and x.shape[0] == 1 and os.environ.get(FUSED_ENV, "1") != "0" and gemv_enabled()
            and not isinstance(weight, PackedInt4) and use_triton(x))


def norm_qkv_rotary_write(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                          qkv_weight: AnyWeight | PackedInt4, qkv_bias: torch.Tensor | None, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, q_norm: torch.Tensor | None = None,
                          k_norm: torch.Tensor | None = None,
                          lora: LayerLoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [T, hidden]` (+ `residual`) -> RMSNorm -> QKV (+ `lora`'s updates) -> (q/k RMSNorm) ->
    RoPE; k and v are stored into the flat caches `[slots, kv_heads, head_dim]` at `slot_mapping [T]`.
    Returns `(q [T, heads, head_dim], x + residual)`."""
    if q_norm is None and k_norm is None and lora is None and fused_single_row(x, qkv_weight):
        return triton_ops.norm_qkv_rotary_write(x, residual, norm_weight, eps, dense(qkv_weight), qkv_bias, cos,
                                                sin, k_cache, v_cache, slot_mapping)
    kv_heads, dim = k_cache.shape[1:]
    x, residual = rms_norm(x, norm_weight, eps, residual)
    qkv = linear(x, qkv_weight, qkv_bias)
    if lora is not None:
        lora.add(qkv, x, "qkv")
    q, k, v = qkv.split((qkv.shape[-1] - 2 * kv_heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q = q.view(q.shape[0], -1, dim)
    k = k.view(-1, kv_heads, dim)
    v = v.view(-1, kv_heads, dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)[0]
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)[0]
    return rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), residual


def norm_gate_up_silu(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      gate_up_weight: AnyWeight | PackedInt4,
                      gate_up_bias: torch.Tensor | None,
                      lora: LayerLoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [T, hidden]` (+ `residual`) -> RMSNorm -> gate-up (+ `lora`'s updates) -> `silu(gate) * up`.
    Returns `(activation [T, intermediate], x + residual)`."""
    if lora is None and fused_single_row(x, gate_up_weight):
        return triton_ops.norm_gate_up_silu(x, residual, norm_weight, eps, dense(gate_up_weight), gate_up_bias)
    x, residual = rms_norm(x, norm_weight, eps, residual)
    if isinstance(gate_up_weight, tuple):  # packed halves: two products, no [T, 2 * inter] in between
        gate, up = gate_up_weight
        bias = (None, None) if gate_up_bias is None else gate_up_bias.split(gate.n)
        g, u = linear(x, gate, bias[0]), linear(x, up, bias[1])
        if lora is not None:
            lora.add(g, x, "gate_up", slice(0, gate.n))
            lora.add(u, x, "gate_up", slice(gate.n, None))
        return F.silu(g) * u, residual
    gate_up = linear(x, gate_up_weight, gate_up_bias)
    if lora is not None:
        lora.add(gate_up, x, "gate_up")
    return silu_and_mul(gate_up), residual
