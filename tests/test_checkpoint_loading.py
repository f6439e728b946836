"""Checkpoint directories: sharded weights, and bad inputs that must fail with an error naming the problem."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import make_hf_model, save_hf_model
from safetensors.torch import load_file, save_file

from lengthwise import CheckpointError, SamplingParams, Tokenizer, generate, load_model
from lengthwise.engine import prompt_logits

PROMPTS = [[4, 8, 15, 16, 23, 42], list(range(3, 40))]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("llama"))


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_gives_same_logits(llama_dir, tmp_path):
    sharded = save_hf_model(make_hf_model("llama", seed=3), tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (sharded / "model.safetensors").exists()
    single = prompt_logits(load_model(llama_dir, "float32", "cpu"), PROMPTS)
    split = prompt_logits(load_model(sharded, "float32", "cpu"), PROMPTS)
    assert torch.equal(single, split)


def test_bad_index_and_json_name_the_file(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        load_model(d, "float32", "cpu")
    (d / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        load_model(d, "float32", "cpu")


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path, "float32", "cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", "float32", "cpu")


def test_unknown_model_type(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt_neox' is not supported"):
        load_model(d, "float32", "cpu")


def test_tensor_of_wrong_shape(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(127, 64\), expected \(128, 64\)"):
        load_model(d, "float32", "cpu")


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.0.self_attn.k_proj.weight"):
        load_model(d, "float32", "cpu")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(d, "float32", "cpu")


def test_no_weights(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d, "float32", "cpu")


def test_missing_tokenizer_files(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        Tokenizer(llama_dir)  # transformers' save_pretrained of a model writes no tokenizer
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="only a SentencePiece tokenizer.model"):
        Tokenizer(tmp_path)


def test_prompt_longer_than_context(llama_dir):
    model = load_model(llama_dir, "float32", "cpu")
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"request '1' is {ctx + 5} tokens.*context of {ctx} tokens"):
        generate(model, [[5], [7] * (ctx + 5)], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="request '0' is empty"):
        generate(model, [[]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 100000]], SamplingParams(max_tokens=4))


def test_generation_stops_at_context_end(llama_dir):
    model = load_model(llama_dir, "float32", "cpu")
    ctx = model.config.max_position_embeddings
    [out] = generate(model, [[5] * (ctx - 3)], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(quantization_config={"quant_method": "fp8"}), "quant_method 'fp8' is not supported.*gptq, awq"),
    (dict(architectures=["LlamaForSequenceClassification"]), "no \\*ForCausalLM"),
    (dict(rms_norm_eps=None), "rms_norm_eps is null"),
    (dict(rope_theta=None), "rope_theta is null"),
])
def test_configs_it_cannot_serve_are_refused_naming_why(llama_dir, tmp_path, changes, match):
    d = _copy(llama_dir, tmp_path)
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_model(d, "float32", "cpu")


def test_tied_checkpoints_storing_the_head_alone_or_a_different_head(tmp_path):
    tied = save_hf_model(make_hf_model("llama-tied-mqa", seed=5), tmp_path / "tied")
    want = prompt_logits(load_model(tied, "float32", "cpu"), PROMPTS)
    tensors = load_file(str(tied / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    only_head = _copy(tied, tmp_path / "a")  # some exporters keep the head and drop the embedding
    save_file({("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in tensors.items()},
              str(only_head / "model.safetensors"))
    assert torch.equal(prompt_logits(load_model(only_head, "float32", "cpu"), PROMPTS), want)
    other_head = _copy(tied, tmp_path / "b")  # tied config, a different head stored: used tied, said aloud
    save_file(dict(tensors, **{"lm_head.weight": torch.randn_like(tensors["model.embed_tokens.weight"])}),
              str(other_head / "model.safetensors"))
    with pytest.warns(UserWarning, match="differs from model.embed_tokens.weight"):
        model = load_model(other_head, "float32", "cpu")
    assert torch.equal(prompt_logits(model, PROMPTS), want)


def test_precomputed_rotary_tables_in_a_checkpoint_are_skipped(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.cos_cached"] = torch.zeros(256, 16)
    tensors["model.layers.0.self_attn.rotary_emb.sin_cached"] = torch.zeros(256, 16)
    save_file(tensors, str(d / "model.safetensors"))
    assert torch.equal(prompt_logits(load_model(d, "float32", "cpu"), PROMPTS),
                       prompt_logits(load_model(llama_dir, "float32", "cpu"), PROMPTS))


def _scaled_context_case(hf, path, limit_message: str):
    """The engine's context is 128 tokens; last-position logits of a 100-token prompt (beyond the
    32 pretrained positions) equal transformers'; a max_model_len of 129 fails naming the limit."""
    from lengthwise import LLM

    llm = LLM(save_hf_model(hf, path), dtype="float32", device="cpu")
    assert llm.engine.max_model_len == 128
    prompt = [(7 * i) % 300 + 3 for i in range(100)]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    got = prompt_logits(llm.engine.model, [prompt])[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    with pytest.raises(ValueError, match=limit_message):
        LLM(path, dtype="float32", device="cpu", max_model_len=129)
    return llm


def test_linear_rope_scaling_stretches_the_context(tmp_path):
    """As vLLM derives it: max_position_embeddings (32) x the linear factor (4)."""
    hf = make_hf_model("llama-rope-linear", seed=2, max_position_embeddings=32)
    _scaled_context_case(hf, tmp_path / "linear", "times its linear rope factor")


def test_yarn_rope_scaling_context_and_logits(tmp_path):
    """As vLLM derives it: the pretrained context x YaRN's factor (32 x 4, below
    max_position_embeddings' 256); cos and sin carry YaRN's temperature."""
    llm = _scaled_context_case(make_hf_model("qwen2-rope-yarn", seed=3), tmp_path / "yarn",
                               "original_max_position_embeddings x factor")
    assert llm.engine.model.rope_scale == pytest.approx(0.1 * math.log(4.0) + 1)
