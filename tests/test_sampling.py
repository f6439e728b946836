"""SamplingParams validation and the sampler's behaviour."""

from __future__ import annotations

import pytest
import torch

from lengthwise import SamplingParams, generate, load_model
from lengthwise.engine.sampler import filter_logits


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"seed": -1}, "seed"), ({"seed": 1.0}, "seed"),
    ({"stop_token_ids": [1, "x"]}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"temperature": float("nan")}, "temperature"), ({"seed": 2**64}, "seed"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.01) == [0]
    p = logits.softmax(-1)
    assert kept(top_p=float(p[0] + p[1] - 1e-4)) == [0, 1]  # smallest prefix reaching the mass
    assert kept(min_p=0.3) == [0, 1]  # p[1]/p[0] = e^-1 = 0.37 >= 0.3, p[2]/p[0] = 0.14 < 0.3
    assert kept() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_hf_model, save_hf_model

    return load_model(save_hf_model(make_hf_model("llama", seed=7), tmp_path_factory.mktemp("s")), "float32", "cpu")


def test_seeded_sample_is_reproducible_and_batch_independent(model):
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=123, ignore_eos=True)
    alone = generate(model, [prompt], params)[0].token_ids
    others = [[9, 10, 11], [12] * 20, [40, 41]]
    batched = generate(model, [others[0], prompt, *others[1:]],
                       [SamplingParams(max_tokens=24, temperature=1.0, seed=i) for i in range(1)] + [params]
                       + [SamplingParams(max_tokens=10, temperature=0.7) for _ in others[1:]])
    assert batched[1].token_ids == alone
    other_seed = generate(model, [prompt], SamplingParams(max_tokens=24, temperature=1.0, seed=124, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_tiny_temperature_is_greedy(model):
    prompt = [[3, 4, 5]]
    greedy = generate(model, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    tiny = generate(model, prompt, SamplingParams(max_tokens=8, temperature=1e-45))
    assert greedy[0].token_ids == tiny[0].token_ids


def test_top_k_1_is_greedy(model):
    prompt = [[3, 4, 5]]
    greedy = generate(model, prompt, SamplingParams(max_tokens=16, temperature=0.0))
    top1 = generate(model, prompt, SamplingParams(max_tokens=16, temperature=1.5, top_k=1))
    assert greedy[0].token_ids == top1[0].token_ids


def test_stop_token_ids_end_generation(model):
    prompt = [[3, 4, 5]]
    free = generate(model, prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = generate(model, prompt, SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_at],
                                                 ignore_eos=True))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
