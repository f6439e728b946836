"""Checkpoint directories: sharded weights, and bad inputs that must fail with an error naming the problem."""

from __future__ import annotations

import json
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
