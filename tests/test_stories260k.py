"""A real trained model, ../shared/models/stories260k: text equal to transformers, and a real stop."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise import SamplingParams, Tokenizer, generate, load_model

pytestmark = requires_stories


@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES, "float32", "cpu"), Tokenizer(STORIES)


@pytest.fixture(scope="module")
def hf_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


def test_greedy_continuation_equals_transformers(stories, hf_stories):
    model, tok = stories
    hf, hf_tok = hf_stories
    prompt = "Once upon a time, there was a little"
    ids = tok.encode(prompt)
    assert ids == hf_tok(prompt).input_ids
    [out] = generate(model, [ids], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=100, min_new_tokens=100, do_sample=False)
    ref_ids = ref[0, len(ids):].tolist()
    assert out.token_ids == ref_ids
    assert tok.decode(out.token_ids) == hf_tok.decode(ref_ids, skip_special_tokens=True)
    assert tok.decode(out.token_ids).startswith("girl named Lily.")


def test_generation_from_bos_stops_at_end_token(stories):
    model, tok = stories
    assert model.config.eos_token_ids == (1, 2)
    [out] = generate(model, [[tok.bos_token_id]], SamplingParams(max_tokens=400, temperature=0.0))
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < 400
    assert out.token_ids[-1] in (1, 2)
    assert not any(t in (1, 2) for t in out.token_ids[:-1])
    assert tok.decode(out.token_ids).startswith("Once upon a time")


def test_batched_prompts_equal_one_at_a_time(stories):
    model, tok = stories
    prompts = [tok.encode(p) for p in ("Lily", "The dog ran to the", "One day, a big bird", "Tom")]
    params = SamplingParams(max_tokens=60, temperature=0.0)
    batched = generate(model, prompts, params)
    for p, b in zip(prompts, batched, strict=True):
        assert generate(model, [p], params)[0].token_ids == b.token_ids
