"""The fused decode forward on the CPU: a step of a few rows through every layer in one C++ call.

The op-by-op torch path spends about half of a batch-1 decode step outside the matmuls (some 50
small ops per layer, each with its dispatch and OpenMP fork/join); `decode_forward.cpp` runs the
whole decoder with one parallel region, so a step costs about what reading the weights costs.
`CausalLM.forward` takes this path when `eligible` says so; everything else (prefill, large
batches, bfloat16, GPUs) keeps the op-by-op path, which is also the reference the tests compare
this one against.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from lengthwise.kv.storage import KVCacheStorage
from lengthwise.ops.attention import AttentionMetadata
from lengthwise.ops.cpu import segment_attention_kernel
from lengthwise.ops.dispatch import kernel_choice
from lengthwise.ops.rotary import rotary_cos_sin

FUSED_ENV = "LENGTHWISE_CPU_FUSED"            # "0" keeps the op-by-op path (an A/B switch)
MAX_ROWS_ENV = "LENGTHWISE_CPU_FUSED_MAX_ROWS"
# Steps with at most this many tokens take the fused path. Beyond it the matmuls are large enough
# that oneDNN's GEMMs on prepacked weights beat the fused path's row-streaming kernel (about even at
# 32 rows: `benchmarks/cpu_decode_candidates.py`, docs/benchmarks.md).
DEFAULT_MAX_ROWS = 24

_LAYER_FIELDS = ("input_norm", "qkv_weight", "qkv_bias", "q_norm", "k_norm", "o_weight", "o_bias",
                 "post_attn_norm", "gate_up_weight", "gate_up_bias", "down_weight", "down_bias")


def max_rows() -> int:
    """The most tokens a step may have to take the fused path (`LENGTHWISE_CPU_FUSED_MAX_ROWS`)."""
    raw = os.environ.get(MAX_ROWS_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_ROWS
    except ValueError:
        raise ValueError(f"{MAX_ROWS_ENV} must be an integer, got {raw!r}") from None


def eligible(model: torch.nn.Module, num_tokens: int) -> bool:
    """Whether a step of `num_tokens` tokens through `model` can take the fused path."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return False
    if os.environ.get(FUSED_ENV, "1") == "0" or kernel_choice() == "torch":
        return False
    lib = segment_attention_kernel()
    if lib is None or not 0 < num_tokens <= min(max_rows(), lib.max_rows):
        return False
    c = model.config
    return c.num_heads <= lib.max_heads and c.head_dim <= lib.max_head_dim and c.head_dim % 2 == 0


class _Pointers:
    """Every layer's weight and cache addresses as one C array, built once per (model, cache)."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheStorage) -> None:
        tensors: list[torch.Tensor | None] = []
        for i, layer in enumerate(model.layers):
            tensors += [getattr(layer, f) for f in _LAYER_FIELDS] + [kv_cache.k[i], kv_cache.v[i]]
        for t in tensors:
            if t is not None and not t.is_contiguous():
                raise ValueError("the fused CPU decode path needs contiguous weights and caches")
        self.layers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() if t is not None else None for t in tensors))
        self.windows = (ctypes.c_int32 * len(model.layers))(*(layer.sliding_window or 0 for layer in model.layers))
        self.key = (id(kv_cache), kv_cache.k[0].data_ptr(), model.layers[0].qkv_weight.data_ptr())


def forward(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_cache: KVCacheStorage) -> torch.Tensor:
    """The same result as `CausalLM.forward` (final-normed hidden states `[T, hidden]`, keys and values
    written into `kv_cache`), computed by `decode_forward.cpp`."""
    lib = segment_attention_kernel()
    ptrs = getattr(model, "_cpu_decode_pointers", None)
    if ptrs is None or ptrs.key != (id(kv_cache), kv_cache.k[0].data_ptr(), model.layers[0].qkv_weight.data_ptr()):
        ptrs = _Pointers(model, kv_cache)
        model._cpu_decode_pointers = ptrs
    c = model.config
    x = F.embedding(input_ids, model.embed).contiguous()
    cos, sin = rotary_cos_sin(positions, model.inv_freq, model.dtype)
    kt = meta.kernel_tensors()
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    pos = positions.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    p = ctypes.c_void_p
    lib.lw_decode_forward(
        ptrs.layers, ptrs.windows, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
        c.intermediate_size, c.rms_norm_eps, c.head_dim ** -0.5, p(model.final_norm.data_ptr()),
        p(x.data_ptr()), p(out.data_ptr()), x.shape[0], p(cos.data_ptr()), p(sin.data_ptr()), p(slots.data_ptr()),
        p(pos.data_ptr()), p(kt.query_start.data_ptr()), meta.num_seqs, p(kt.prompt_lens.data_ptr()),
        p(kt.response_lens.data_ptr()), p(kt.prompt_block_tables.data_ptr()), kt.prompt_block_tables.shape[1],
        p(kt.response_block_tables.data_ptr()), kt.response_block_tables.shape[1], meta.block_size,
        torch.get_num_threads())
    return out
