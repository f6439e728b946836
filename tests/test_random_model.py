"""Random-initialised test models: deterministic from their seed, cached, and they generate."""

from __future__ import annotations

import hashlib

from lengthwise import SamplingParams, Tokenizer, generate, load_model
from lengthwise.model.random_model import random_model_dir


def _digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(random_model, tmp_path):
    again = random_model_dir(seed=0, cache_dir=tmp_path / "a")
    assert _digest(again) == _digest(random_model)
    other = random_model_dir(seed=1, cache_dir=tmp_path / "b")
    assert _digest(other)["model.safetensors"] != _digest(random_model)["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(random_model)["tokenizer.json"]


def test_cached_after_first_use(random_model):
    before = (random_model / "model.safetensors").stat().st_mtime_ns
    assert random_model_dir(seed=0, cache_dir=random_model.parent) == random_model
    assert (random_model / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in random_model.parent.iterdir() if p.name.startswith(".building")]


def test_random_model_generates_text(random_model):
    tok = Tokenizer(random_model)
    model = load_model(random_model, "float32", "cpu")
    assert model.config.model_type == "llama" and model.config.num_kv_heads < model.config.num_heads
    ids = tok.encode("Tell me about the river")
    [out] = generate(model, [ids], SamplingParams(max_tokens=20, temperature=0.8, seed=0, ignore_eos=True))
    assert len(out.token_ids) == 20
    text = tok.decode(out.token_ids)
    assert len(text.strip()) > 0
    # Round trip through the tokenizer: whole words are single tokens.
    assert tok.decode(tok.encode(" the river")) == " the river"
    assert len(tok.encode("the river", add_special_tokens=False)) == 2
