"""Config parsing: both transformers layouts, every family flag, and errors that name the problem."""

from __future__ import annotations

import pytest

from lengthwise.model import CheckpointError, ModelConfig

LLAMA31_V4 = {  # Llama 3.1 as published (transformers 4.x layout), shrunk
    "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama31_v4_layout():
    c = ModelConfig.from_hf(LLAMA31_V4)
    assert c.rope.theta == 500000.0 and c.rope.type == "llama3" and c.rope.factor == 8.0
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.head_dim == 16 and not c.qkv_bias and not c.qk_norm


def test_generation_config_eos_list_wins():
    c = ModelConfig.from_hf({**LLAMA31_V4, "eos_token_id": 2}, {"eos_token_id": [1, 2]})
    assert c.eos_token_ids == (1, 2)


def test_family_flags():
    base = {k: v for k, v in LLAMA31_V4.items() if k != "rope_scaling"}
    qwen2 = ModelConfig.from_hf({**base, "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_bias
    qwen3 = ModelConfig.from_hf({**base, "model_type": "qwen3", "head_dim": 128})
    assert qwen3.qk_norm and qwen3.head_dim == 128
    mistral = ModelConfig.from_hf({**base, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_windows == (4096, 4096)
    qwen_sw = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 64,
                                   "use_sliding_window": True, "max_window_layers": 1})
    assert qwen_sw.sliding_windows == (None, 64)
    qwen_off = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 64})
    assert qwen_off.sliding_windows == (None, None)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs 'factor'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be positive"),
    ({"eos_token_id": [1, None]}, "eos_token_id must be a token id"),
])
def test_bad_config_names_the_problem(change, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf({**LLAMA31_V4, **change})


def test_missing_field_is_named():
    raw = dict(LLAMA31_V4)
    del raw["intermediate_size"]
    with pytest.raises(CheckpointError, match="'intermediate_size' is missing"):
        ModelConfig.from_hf(raw)
