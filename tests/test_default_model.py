"""The built-in default model: deterministic from its seed, cached, and it generates."""

from __future__ import annotations

import hashlib

from lengthwise import SamplingParams, Tokenizer, generate, load_model
from lengthwise.model.default import default_model_dir


def _digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(default_model, tmp_path):
    again = default_model_dir(seed=0, cache_dir=tmp_path / "a")
    assert _digest(again) == _digest(default_model)
    other = default_model_dir(seed=1, cache_dir=tmp_path / "b")
    assert _digest(other)["model.safetensors"] != _digest(default_model)["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(default_model)["tokenizer.json"]


def test_cached_after_first_use(default_model):
    before = (default_model / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir(seed=0, cache_dir=default_model.parent) == default_model
    assert (default_model / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in default_model.parent.iterdir() if p.name.startswith(".building")]


def test_default_model_generates_text(default_model):
    tok = Tokenizer(default_model)
    model = load_model(default_model, "float32", "cpu")
    assert model.config.model_type == "llama" and model.config.num_kv_heads < model.config.num_heads
    ids = tok.encode("Tell me about the river")
    [out] = generate(model, [ids], SamplingParams(max_tokens=20, temperature=0.8, seed=0, ignore_eos=True))
    assert len(out.token_ids) == 20
    text = tok.decode(out.token_ids)
    assert len(text.strip()) > 0
    # Round trip through the tokenizer: whole words are single tokens.
    assert tok.decode(tok.encode(" the river")) == " the river"
    assert len(tok.encode("the river", add_special_tokens=False)) == 2
