"""A differentiable forward pass of a loaded `CausalLM`, for training LoRA adapters on the served model.

The serving forward (`CausalLM.forward`) runs under inference mode on a paged KV cache, with fused
kernels and packed CPU panels, none of which has a backward. This module computes the same
decoder in plain torch ops on a right-padded batch `[B, T]`: the checkpoint's weights stay frozen
(they are not parameters of anything being optimised) and only the adapter's low-rank factors,
`lengthwise.lora.train.LoRAFactors`, receive gradients. The adapter it trains is then served by the engine's own LoRA
path (`lengthwise.lora`), so this forward must agree with that path: tests compare both with
transformers and with the engine serving the saved adapter.

Dense decoder layers only: a mixture-of-experts or a quantized model is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lengthwise.model.llama import CausalLM, DecoderLayer
from lengthwise.ops.rotary import apply_rotary, rotary_cos_sin


class Adapter(Protocol):
    """What the forward needs of a trainable adapter (`lengthwise.lora.train.LoRAFactors`)."""

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """The update of PEFT module `module`'s output (`q_proj`, ..., `down_proj`) in decoder
        layer `layer` for its input `x`; None where the module is not adapted."""


def check_trainable(model: CausalLM) -> None:
    """Refuse, naming why, a model this forward cannot train through; unpack a packed CPU model."""
    from lengthwise.ops.cpu import decode as cpu_decode

    if model.config.moe is not None:
        raise ValueError("LoRA training supports dense decoder layers; this checkpoint has mixture-of-experts layers")
    if model.quantization is not None:
        raise ValueError(f"LoRA training needs the unquantized weights; this model is {model.quantization!r}: "
                         f"load the checkpoint without quantization")
    if not model.generates:
        raise ValueError("this checkpoint has no LM head, so it cannot be trained to answer")
    cpu_decode.unpack_model(model)  # panels -> dense parameters (a no-op where unpacked)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the serving path and transformers compute it (float32 inside, weight after the cast)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _adapted(out: torch.Tensor, lora: Adapter | None, layer: int, parts: Sequence[tuple[str, int, int]],
             x: torch.Tensor) -> torch.Tensor:
    """`out` with the LoRA updates of the modules `parts` ((module, start, stop) columns) added."""
    if lora is None:
        return out
    for module, start, stop in parts:
        d = lora.delta(layer, module, x)
        if d is not None:
            pad = (start, out.shape[-1] - stop)
            out = out + F.pad(d, pad).to(out.dtype)
    return out


def _layer(model: CausalLM, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           mask: torch.Tensor | None, lora: Adapter | None) -> torch.Tensor:
    layer: DecoderLayer = model.layers[index]
    c = model.config
    b, t, _ = x.shape
    h = _norm(x, layer.input_norm, c.rms_norm_eps)
    q_end, k_end = c.q_size, c.q_size + c.kv_size
    qkv = _adapted(F.linear(h, layer.qkv_weight, layer.qkv_bias), lora, index,
                   (("q_proj", 0, q_end), ("k_proj", q_end, k_end), ("v_proj", k_end, k_end + c.kv_size)), h)
    q = qkv[..., :q_end].view(b, t, c.num_heads, c.head_dim)
    k = qkv[..., q_end:k_end].view(b, t, c.num_kv_heads, c.head_dim)
    v = qkv[..., k_end:].view(b, t, c.num_kv_heads, c.head_dim)
    if layer.q_norm is not None:
        q, k = _norm(q, layer.q_norm, c.rms_norm_eps), _norm(k, layer.k_norm, c.rms_norm_eps)
    q = apply_rotary(q.reshape(b * t, c.num_heads, c.head_dim), cos, sin).view(b, t, c.num_heads, c.head_dim)
    k = apply_rotary(k.reshape(b * t, c.num_kv_heads, c.head_dim), cos, sin).view(b, t, c.num_kv_heads, c.head_dim)
    group = c.num_heads // c.num_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, is_causal=mask is None, scale=layer.scale)
    attn = attn.transpose(1, 2).reshape(b, t, c.q_size)
    x = x + _adapted(F.linear(attn, layer.o_weight, layer.o_bias), lora, index, (("o_proj", 0, c.hidden_size),), attn)
    h = _norm(x, layer.post_attn_norm, c.rms_norm_eps)
    inter = c.intermediate_size
    gate_up = _adapted(F.linear(h, layer.gate_up_weight, layer.gate_up_bias), lora, index,
                       (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter)), h)
    act = F.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    down = _adapted(F.linear(act, layer.down_weight, layer.down_bias), lora, index, (("down_proj", 0, c.hidden_size),),
                    act)
    return x + down


def hidden_states(model: CausalLM, input_ids: torch.Tensor, lora: Adapter | None = None,
                  gradient_checkpointing: bool = False) -> torch.Tensor:
    """Final (normed) hidden states `[B, T, hidden]` of right-padded `input_ids [B, T]`, each row
    starting at position 0. Padding at a row's end never reaches its earlier positions (causal
    attention), so a row's states equal those of the row alone. Differentiable in `lora`'s factors;
    `gradient_checkpointing` recomputes each layer in the backward pass instead of keeping its
    activations."""
    check_trainable(model)
    c = model.config
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device)
    cos, sin = rotary_cos_sin(positions.repeat(b), model.inv_freq, model.dtype, model.rope_scale)
    x = model.embed_tokens(input_ids)
    masks: dict[int | None, torch.Tensor | None] = {None: None}
    for i in range(c.num_layers):
        window = c.sliding_windows[i]
        if window is not None and window < t and window not in masks:
            rows, cols = positions[:, None], positions[None, :]
            masks[window] = (cols <= rows) & (cols > rows - window)
        mask = masks[window if window is not None and window < t else None]
        if gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_layer, model, i, x, cos, sin, mask, lora, use_reentrant=False)
        else:
            x = _layer(model, i, x, cos, sin, mask, lora)
    return _norm(x, model.final_norm, c.rms_norm_eps)


def logits(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of hidden states (any leading shape) through `model`'s LM head."""
    return F.linear(hidden, model.lm_head).float()
