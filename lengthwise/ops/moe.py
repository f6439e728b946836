"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): top-k routing and the experts.

Routing is transformers' own: router logits in the model's dtype, a float32 softmax over all
experts, the top k, optionally renormalised to sum to 1 (Mixtral always; Qwen by
`norm_topk_prob`); Qwen casts the weights back to the model's dtype, Mixtral keeps them in
float32 and so sums the weighted experts in float32 (in half precision the two differ).

The experts run grouped: the T x k (token, expert) pairs are sorted by expert and each expert's
SwiGLU runs once over all of its tokens, reading its weights once however many tokens chose it
(a decode step reads only the experts its rows picked, which is the whole point of a sparse model
on bandwidth-bound hardware). On CUDA, `torch._grouped_mm` does each projection for all experts
in one call, with no host sync, where this torch has it for the dtype (checked once, on a small
product, against the loop). On the CPU, and on CUDA without it, a loop over the experts that were
hit: on this 2-core CPU the loop was as fast as the grouped call at 1 token and 25% faster at 64
(8 experts, top 2, 768 x 1024; `_grouped_mm`'s CPU version is itself a loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lengthwise.ops.activation import silu_and_mul
from lengthwise.ops.cpu import PackedWeight
from lengthwise.ops.linear import linear

# Experts as a layer holds them: stacked tensors `[E, 2I, H]` / `[E, H, I]`, or (a packed CPU
# model, `lengthwise.ops.cpu.decode.pack_model`) per expert the panels of (gate, up) and of down.
ExpertsGateUp = torch.Tensor | list[tuple[PackedWeight, PackedWeight]]
ExpertsDown = torch.Tensor | list[PackedWeight]

_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
          float32_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weights [T, top_k], expert ids [T, top_k])` for tokens `x [T, H]`; the weights in x's
    dtype, or in float32 with `float32_weights` (Mixtral)."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if float32_weights else weights.to(x.dtype)), ids


def moe_experts(x: torch.Tensor, gate_up: ExpertsGateUp, down: ExpertsDown, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """`sum_j weights[t, j] * down[e] @ silu_and_mul(gate_up[e] @ x[t])` with `e = ids[t, j]`.

    `gate_up [E, 2I, H]` (each expert's gate rows, then its up rows), `down [E, H, I]`, or their
    per-expert panels."""
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)        # the (token, slot) pairs grouped by expert
    rows = x[order // top_k]                          # [T*k, H], each token once per expert it chose
    counts = torch.zeros(len(gate_up), dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    if isinstance(gate_up, torch.Tensor) and _grouped_ok(x.device, x.dtype):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        h = silu_and_mul(torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets))
        out = torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)
    else:
        out = _loop(rows, gate_up, down, counts.tolist())
    out = out * weights.reshape(-1)[order, None]  # (float32 weights: products in float32)
    # Back to (token, slot) order and summed over the slots: deterministic, no atomics.
    result = torch.empty_like(out)
    result[order] = out
    return result.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _loop(rows: torch.Tensor, gate_up: ExpertsGateUp, down: ExpertsDown, counts: list[int]) -> torch.Tensor:
    """The grouped products one expert at a time, skipping experts no token chose."""
    out = rows.new_empty(rows.shape)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = slice(start, start + n)
            out[seg] = swiglu(rows[seg], gate_up[e], down[e])
            start += n
    return out


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | tuple[PackedWeight, PackedWeight],
           down: torch.Tensor | PackedWeight) -> torch.Tensor:
    """`down @ (silu(gate @ x) * (up @ x))` for one expert: `gate_up` stacked `[2I, H]` or its packed
    (gate, up) halves."""
    if isinstance(gate_up, tuple):
        gate, up = gate_up
        return linear(F.silu(linear(x, gate)) * linear(x, up), down)
    return linear(silu_and_mul(linear(x, gate_up)), down)


def _grouped_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs for `device`/`dtype` here and agrees with the loop (once)."""
    if device.type != "cuda":
        return False
    key = (str(device), dtype)
    if key not in _GROUPED_OK:
        _GROUPED_OK[key] = _probe_grouped(device, dtype)
    return _GROUPED_OK[key]


def _probe_grouped(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(24, 32, generator=g).to(device, dtype)
    w = torch.randn(3, 16, 32, generator=g).to(device, dtype)
    offsets = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # one empty group
    try:
        got = torch._grouped_mm(a, w.transpose(1, 2), offs=offsets).float()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = torch.cat([a[:8] @ w[0].T, a[8:24] @ w[2].T]).float()
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))
