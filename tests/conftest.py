"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers, and ../shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep the suite deterministic and off a busy second core.
torch.set_num_threads(int(os.environ.get("LENGTHWISE_TEST_THREADS", "1")))

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before anything
# imports triton (transformers does), because triton's own @jit helpers are built at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260k"

requires_stories = pytest.mark.skipif(
    not STORIES.is_dir(), reason=f"{STORIES} is absent (../shared not beside the repo)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, model class name, overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-head-dim-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=32, attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with every parameter (biases and norms too) randomised."""
    import transformers

    config_cls, model_cls, family_overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**BASE, **family_overrides, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: `hf_checkpoint(family)` -> (transformers model, checkpoint dir), cached per family."""
    cache: dict[str, tuple] = {}

    def build(family: str):
        if family not in cache:
            model = make_hf_model(family)
            cache[family] = (model, save_hf_model(model, tmp_path_factory.mktemp(family)))
        return cache[family]

    return build


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """The built-in default model, built into a temporary cache."""
    from lengthwise.model.default import default_model_dir

    return default_model_dir(seed=0, cache_dir=tmp_path_factory.mktemp("lw-cache"))
