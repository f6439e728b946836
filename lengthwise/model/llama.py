"""The decoder: one implementation for Llama, Mistral, Qwen2 and Qwen3 checkpoints and their
mixture-of-experts relatives (Mixtral, Qwen2-MoE, Qwen3-MoE).

The family only switches features (q/k/v bias, q/k RMSNorm, sliding windows, RoPE scaling, sparse
MLP layers) on in `ModelConfig`. Weights arrive fused from the loader: one QKV matrix and one
gate-up matrix per layer (per expert, stacked, in a sparse layer). The model knows nothing about
batching policy: a forward pass takes a flat list of tokens, their positions, and the per-step
`AttentionMetadata` that says where each sequence's context lives in the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model.config import ModelConfig
from lengthwise.ops import (
    AttentionMetadata,
    linear,
    paged_attention,
    rms_norm,
    rotary_cos_sin,
    rotary_inv_freq,
)
from lengthwise.ops.cpu import decode as cpu_decode
from lengthwise.ops.fused import norm_gate_up_silu, norm_qkv_rotary_write
from lengthwise.ops.lora import LayerLoRA, LoRABatch
from lengthwise.ops.moe import moe_experts, route, swiglu


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP (or a sparse mixture of SwiGLU experts), with the residual
    add fused into the following norm.

    A sparse layer holds `router_weight [E, H]`, `experts_gate_up [E, 2I, H]` and `experts_down
    [E, H, I]`; its `gate_up_weight`/`down_weight` are Qwen2-MoE's shared expert, or None."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        c = config
        self.config = c
        self.sliding_window = c.sliding_windows[layer_idx]
        self.scale = c.head_dim ** -0.5
        h, qkv = c.hidden_size, c.q_size + 2 * c.kv_size
        # A quantized checkpoint's projections are allocated by the loader (`load_model`): most stay
        # 4-bit, and a dense copy of all of them would need the memory the 4 bits save.
        proj = "meta" if c.quantization is not None else device
        self.input_norm = _param((h,), dtype, device)
        self.qkv_weight = _param((qkv, h), dtype, proj)
        self.qkv_bias = _param((qkv,), dtype, device) if c.qkv_bias else None
        self.q_norm = _param((c.head_dim,), dtype, device) if c.qk_norm else None
        self.k_norm = _param((c.head_dim,), dtype, device) if c.qk_norm else None
        self.o_weight = _param((h, c.q_size), dtype, proj)
        self.o_bias = _param((h,), dtype, device) if c.o_bias else None
        self.post_attn_norm = _param((h,), dtype, device)
        moe = c.moe if c.moe is not None and c.moe.sparse_layers[layer_idx] else None
        self.moe = moe
        self.router_weight = self.experts_gate_up = self.experts_down = self.shared_gate_weight = None
        inter = c.intermediate_size
        if moe is not None:
            e, i = moe.num_experts, moe.expert_intermediate_size
            self.router_weight = _param((e, h), dtype, device)
            self.experts_gate_up = _param((e, 2 * i, h), dtype, proj)
            self.experts_down = _param((e, h, i), dtype, proj)
            inter = moe.shared_expert_intermediate_size
            if inter:
                self.shared_gate_weight = _param((1, h), dtype, device)
        self.gate_up_weight = _param((2 * inter, h), dtype, proj) if inter else None
        self.gate_up_bias = _param((2 * inter,), dtype, device) if c.mlp_bias and inter else None
        self.down_weight = _param((h, inter), dtype, proj) if inter else None
        self.down_bias = _param((h,), dtype, device) if c.mlp_bias and inter else None
        # name -> Int8Weight or Int4Weight for the projections `quantize_model` replaced or a GPTQ/AWQ
        # checkpoint stored in 4 bits (their parameters then hold the dequantized weights, unless
        # the model is packed at load); the fused CPU decode path packs these.
        self.quantized: dict = {}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                lora: LayerLoRA | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer on `x [T, hidden]`; `lora`: the LoRA adapters' updates of this layer's rows."""
        c = self.config
        # Norm, QKV, RoPE and the KV write; one kernel for a single row on the Triton path.
        q, residual = norm_qkv_rotary_write(x, residual, self.input_norm, c.rms_norm_eps, self.qkv_weight,
                                            self.qkv_bias, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                            self.q_norm, self.k_norm, lora)
        attn = paged_attention(q, k_cache, v_cache, positions, meta, self.scale, self.sliding_window)
        attn = attn.reshape(-1, c.q_size)
        x = linear(attn, self.o_weight, self.o_bias)
        if lora is not None:
            lora.add(x, attn, "o")
        if self.moe is not None:
            return self._sparse_mlp(x, residual)
        x, residual = norm_gate_up_silu(x, residual, self.post_attn_norm, c.rms_norm_eps, self.gate_up_weight,
                                        self.gate_up_bias, lora)
        out = linear(x, self.down_weight, self.down_bias)
        return (out if lora is None else lora.add(out, x, "down")), residual

    def _sparse_mlp(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = rms_norm(x, self.post_attn_norm, self.config.rms_norm_eps, residual)
        return self.sparse_mlp(x), residual

    def sparse_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """A sparse layer's MLP on normed `x [T, H]`: the routed experts, plus Qwen2-MoE's shared
        expert under its sigmoid gate (transformers' `*SparseMoeBlock`)."""
        moe = self.moe
        weights, ids = route(x, self.router_weight, moe.top_k, moe.norm_topk_prob, moe.float32_weights)
        out = moe_experts(x, self.experts_gate_up, self.experts_down, weights, ids)
        if self.gate_up_weight is not None:
            shared = swiglu(x, self.gate_up_weight, self.down_weight)
            out = out + torch.sigmoid(F.linear(x, self.shared_gate_weight)) * shared
        return out


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head. Construct through `lengthwise.model.load_model`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = _param((config.vocab_size, config.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, device) for i in range(config.num_layers))
        self.final_norm = _param((config.hidden_size,), dtype, device)
        self.lm_head = (self.embed if config.tie_word_embeddings
                        else _param((config.vocab_size, config.hidden_size), dtype, device))
        r = config.rope
        self.register_buffer("inv_freq", rotary_inv_freq(
            config.head_dim, r.theta, r.type, r.factor, r.low_freq_factor, r.high_freq_factor,
            r.original_max_position_embeddings, r.beta_fast, r.beta_slow, r.truncate).to(self.device),
            persistent=False)
        self.rope_scale = r.attention_factor  # on cos and sin: YaRN's attention temperature, else 1
        self.quantization: str | None = None  # set by `lengthwise.model.quantize.quantize_model`
        # False for a base checkpoint stored without its LM head (an embedding model): the engine
        # embeds with it and refuses to generate (`lm_head` is then the embedding, never read).
        self.generates = True
        # On the CPU, `lengthwise.ops.cpu.decode.pack_model` replaces the decoder projections by their
        # panels (`PackedWeight`s) and packs the LM head here (then also `lm_head` itself, if untied).
        self.head_panels = None

    def new_kv_cache(self, num_blocks: int, block_size: int = 16,
                     dtype: torch.dtype | None = None) -> KVCacheStorage:
        """A KV cache shaped for this model, on its device, in `dtype` (default: the model's)."""
        c = self.config
        return KVCacheStorage(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                              dtype or self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCacheStorage, lora: LoRABatch | None = None) -> torch.Tensor:
        """Run `input_ids [T]` at `positions [T]`; return the final hidden states `[T, hidden]`.

        Every new token's key and value is written into `kv_cache` at `meta.slot_mapping`; `lora`:
        which rows use which LoRA adapter. Decode steps on the CPU run all layers in one fused C++
        call (`lengthwise.ops.cpu.decode`), adapters included.
        """
        qs = meta.query_start
        longest = max(b - a for a, b in zip(qs[:-1], qs[1:], strict=True))
        if cpu_decode.eligible(self, input_ids.shape[0], longest):
            return cpu_decode.forward(self, input_ids, positions, meta, kv_cache, lora)
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.dtype, self.rope_scale)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, positions, meta, kv_cache.k[i], kv_cache.v[i],
                                None if lora is None else lora.layer(i))
        return rms_norm(x, self.final_norm, self.config.rms_norm_eps, residual)[0]

    def fused_step_tokens(self) -> int | None:
        """The most tokens a step may have to take the fused CPU decode path (at most 16 per
        sequence); None where there is no such path (a GPU, a bfloat16 model, the path off)."""
        return cpu_decode.max_rows() if cpu_decode.eligible(self, 1) else None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of `input_ids`, in the model's dtype (a packed CPU model may hold a
        bfloat16 checkpoint's embedding in bfloat16: `pack_model`)."""
        return F.embedding(input_ids, self.embed).to(self.dtype)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[N, vocab]` in float32 for the hidden states of the rows to sample from."""
        if cpu_decode.eligible(self, hidden.shape[0]) and getattr(self, "_cpu_decode_pointers", None) is not None:
            return cpu_decode.logits(self, hidden)
        return linear(hidden, self.lm_head if self.head_panels is None else self.head_panels).float()

    def num_parameters(self) -> int:
        """Parameters of the checkpoint's architecture, packed or not (a tied head counted once)."""
        dense = sum(p.numel() for p in self.parameters())
        packed = cpu_decode.projection_panels(self)
        if not self.config.tie_word_embeddings and not isinstance(self.lm_head, torch.Tensor):
            packed.append(self.lm_head)
        return dense + sum(w.n * w.k for w in packed)
