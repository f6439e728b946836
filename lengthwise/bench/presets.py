"""Named random-initialised model presets for benchmarks, written once into the model cache.

A preset is a Llama (or Qwen3-MoE) checkpoint in the real Hugging Face layout (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), made deterministically from a seed
(normal init, std 0.02, norms at 1) with the random test model's byte-level BPE tokenizer (`model/random_model.py`).
transformers is not needed to build one. The weights are random, so the text is word salad, but
the shapes, and so the cost of every forward pass, are those of a real model of that size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lengthwise.model.random_model import CHAT_TEMPLATE, build_once, build_tokenizer, default_cache_dir

PRESET_FORMAT_VERSION = 1
INIT_STD = 0.02


@dataclass(frozen=True)
class LlamaPreset:
    """The shape of a random Llama checkpoint. `vocab_size=None` means the tokenizer's size.
    With `num_experts` > 0 it is a Qwen3-MoE checkpoint instead: every layer's MLP is
    `num_experts` experts of `moe_intermediate_size`, `num_experts_per_tok` per token
    (renormalised, as Qwen3-30B-A3B), with Qwen3's q/k norms."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    dtype: str = "float32"  # the safetensors dtype on disk (bfloat16 halves a large preset's size)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0


PRESETS: dict[str, LlamaPreset] = {
    # About 3.6M parameters: fast enough for tests and smoke runs.
    "llama-tiny": LlamaPreset(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=4, vocab_size=None, max_position_embeddings=2048,
                              tie_word_embeddings=False),
    # About 110M parameters (85M in the decoder layers, a tied 32000 x 768 embedding).
    "llama-100m": LlamaPreset(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                              num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048,
                              tie_word_embeddings=True),
    # The same stored in bfloat16, as real checkpoints are: served in float32 on the CPU, its fused
    # decode path streams bfloat16 panels (`benchmarks/cpu_weight_formats.py`).
    "llama-100m-bf16": LlamaPreset(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                                   max_position_embeddings=2048, tie_word_embeddings=True, dtype="bfloat16"),
    # The shape of Llama-3.2-1B (1.24B parameters, tied 128256 x 2048 embedding), stored in bfloat16:
    # the GPU benchmark model of the kernels issue.
    "llama-1b": LlamaPreset(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                            tie_word_embeddings=True, rope_theta=500000.0, dtype="bfloat16"),
    # A Qwen3-MoE in miniature (Qwen3-30B-A3B's fine-grained experts: 8 of 64 per token, each a
    # third of hidden wide): 497M parameters, 99M active per token (24.6M of them the tied head).
    "qwen3-moe-500m": LlamaPreset(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                  max_position_embeddings=2048, tie_word_embeddings=True, dtype="bfloat16",
                                  num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256),
}


def preset_dir(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Path of preset `name` built from `seed`, writing it into the cache first if it is not there yet."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache / f"bench-{name}-v{PRESET_FORMAT_VERSION}-seed{seed}",
                      lambda out: write_preset(out, PRESETS[name], seed))


def resolve_model(model: str, seed: int = 0, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """`--model`: a checkpoint directory, or a preset name. Returns (directory, a label for reports)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model!r}: directory has no config.json, so it is not a checkpoint")
        return path, str(path)
    if model in PRESETS:
        return preset_dir(model, seed, cache_dir), model
    raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a known preset "
                     f"(presets: {', '.join(PRESETS)})")


def write_preset(out_dir: str | Path, preset: LlamaPreset, seed: int = 0, tokenizer: Tokenizer | None = None) -> None:
    """Write a random-initialised Llama checkpoint with `preset`'s shape to `out_dir`, with the
    random test model's tokenizer or `tokenizer` (whose ids 0, 1, 2 must be <unk>, <s>, </s>)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer() if tokenizer is None else tokenizer
    tok.save(str(out / "tokenizer.json"))
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok_vocab if preset.vocab_size is None else preset.vocab_size
    if vocab < tok_vocab:
        raise ValueError(f"preset vocab_size {vocab} is smaller than the tokenizer's {tok_vocab} tokens")
    hidden, inter, layers = preset.hidden_size, preset.intermediate_size, preset.num_hidden_layers
    heads, kv_heads = preset.num_attention_heads, preset.num_key_value_heads
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": preset.max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": preset.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": INIT_STD, "tie_word_embeddings": preset.tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": preset.dtype,
    }
    if preset.num_experts:
        config.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                       "num_experts": preset.num_experts, "num_experts_per_tok": preset.num_experts_per_tok,
                       "moe_intermediate_size": preset.moe_intermediate_size, "norm_topk_prob": True,
                       "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": preset.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * INIT_STD

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    if not preset.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        })
        if not preset.num_experts:
            tensors.update({p + "mlp.gate_proj.weight": normal(inter, hidden),
                            p + "mlp.up_proj.weight": normal(inter, hidden),
                            p + "mlp.down_proj.weight": normal(hidden, inter)})
            continue
        tensors.update({p + "self_attn.q_norm.weight": torch.ones(head_dim),
                        p + "self_attn.k_norm.weight": torch.ones(head_dim),
                        p + "mlp.gate.weight": normal(preset.num_experts, hidden)})
        expert = preset.moe_intermediate_size
        for e in range(preset.num_experts):
            tensors.update({p + f"mlp.experts.{e}.gate_proj.weight": normal(expert, hidden),
                            p + f"mlp.experts.{e}.up_proj.weight": normal(expert, hidden),
                            p + f"mlp.experts.{e}.down_proj.weight": normal(hidden, expert)})
    dtype = getattr(torch, preset.dtype)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
