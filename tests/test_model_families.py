"""Every supported family (mixture-of-experts ones too) matches transformers: last-position logits
and 32 greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES

from lengthwise import SamplingParams, generate, load_model
from lengthwise.engine import prompt_logits
from lengthwise.ops.cpu import dense

PROMPT_LENS = (3, 11, 24, 40)  # crosses block (16) and sliding-window (8) boundaries


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_last_logits(hf, prompts):
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1].float() for p in prompts])


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_last_position_logits_match_transformers(family, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = load_model(path, "float32", "cpu")
    prompts = _prompts(hf.config.vocab_size)
    ours = prompt_logits(model, prompts)
    ref = _hf_last_logits(hf, prompts)
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_greedy_32_tokens_identical_to_transformers(family, hf_checkpoint):
    hf, path = hf_checkpoint(family)
    model = load_model(path, "float32", "cpu")
    prompts = _prompts(hf.config.vocab_size, seed=2)
    ours = generate(model, prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()
    # The batch ran together: at least one sequence used the full budget.
    assert any(len(o.token_ids) == 32 for o in ours)


def test_fused_weights_are_one_matrix_each(hf_checkpoint):
    hf, path = hf_checkpoint("qwen2")
    model = load_model(path, "float32", "cpu")
    layer = model.layers[0]
    c = model.config
    qkv, gate_up = dense(layer.qkv_weight), dense(layer.gate_up_weight)  # (packed on the CPU)
    assert qkv.shape == (c.q_size + 2 * c.kv_size, c.hidden_size)
    assert gate_up.shape == (2 * c.intermediate_size, c.hidden_size)
    attn = hf.model.layers[0].self_attn
    assert torch.equal(qkv[c.q_size:c.q_size + c.kv_size], attn.k_proj.weight)
    assert torch.equal(layer.qkv_bias[-c.kv_size:], attn.v_proj.bias)


def test_tied_embeddings_share_storage(hf_checkpoint):
    """Tied, `lm_head` is the embedding parameter (on the CPU the head's panels are a packed copy of it)."""
    _, path = hf_checkpoint("llama-tied-mqa")
    model = load_model(path, "float32", "cpu")
    assert model.lm_head is model.embed
    assert torch.equal(model.head_panels.unpack(), model.embed)
    hf, path = hf_checkpoint("llama")
    model = load_model(path, "float32", "cpu")  # untied: the head is packed on its own
    assert torch.equal(dense(model.lm_head), hf.lm_head.weight)
    assert not torch.equal(dense(model.lm_head), model.embed)


def test_sliding_window_changes_the_result(hf_checkpoint, tmp_path):
    """Guard against a window that is parsed but ignored: without it the logits differ."""
    import json
    import shutil

    _, path = hf_checkpoint("mistral-sliding")
    no_window = tmp_path / "no-window"
    shutil.copytree(path, no_window)
    cfg = json.loads((no_window / "config.json").read_text())
    cfg["sliding_window"] = None
    (no_window / "config.json").write_text(json.dumps(cfg))
    prompts = [_prompts(320)[-1]]
    with_w = prompt_logits(load_model(path, "float32", "cpu"), prompts)
    without = prompt_logits(load_model(no_window, "float32", "cpu"), prompts)
    assert _rel_err(with_w, without) > 1e-3
