"""The sampler: penalties, filters, draws, logprobs, and that no row depends on its batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lengthwise import SamplingParams, generate, load_model
from lengthwise.engine.sampler import SampleOutput, TokenLogprobs, filter_logits, make_generator, sample

CPU = torch.device("cpu")


def run(logits, params, seeds=None, prompts=None, outputs=None) -> SampleOutput:
    """`sample` with a fresh generator per sampled row (seeded `seeds[i]`, default `i`)."""
    r = logits.shape[0]
    seeds = list(range(r)) if seeds is None else seeds
    gens = [None if p.greedy else make_generator(s, CPU) for p, s in zip(params, seeds, strict=True)]
    return sample(logits, params, gens, prompts or [[] for _ in range(r)], outputs or [[] for _ in range(r)])


def reference_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sort-based filter the sampler replaced (no ties in random floats, so the same sets)."""
    x = logits / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], -math.inf)
    if p.top_p < 1:
        s, order = torch.sort(x, descending=True)
        probs = s.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        x = x.masked_fill(drop.scatter(0, order, drop), -math.inf)
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    return x


def reference_penalties(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    """vLLM's dense formulation: repetition over prompt + output, then frequency, then presence."""
    v = logits.numel()
    seen = torch.zeros(v, dtype=torch.bool)
    seen[torch.tensor(prompt + out, dtype=torch.long)] = True
    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=v).float()
    rep = torch.where(seen, torch.tensor(p.repetition_penalty), torch.tensor(1.0))
    x = torch.where(logits > 0, logits / rep, logits * rep)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def mixed_params(rng: random.Random, n: int) -> list[SamplingParams]:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, logprobs=3),
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=20, logprobs=0),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.05),
        dict(temperature=1.0, min_p=0.1, logprobs=5),
        dict(temperature=0.8, top_p=0.95, frequency_penalty=0.7, repetition_penalty=0.8),
        dict(temperature=2.0, top_p=0.99),  # flat: the nucleus outgrows the first candidate lists
        dict(temperature=1.0, presence_penalty=-1.0, frequency_penalty=0.3, logprobs=20),
    ]
    return [SamplingParams(seed=i, **kinds[rng.randrange(len(kinds))]) for i in range(n)]


@pytest.mark.parametrize("vocab", [1003, 32000])
def test_row_result_does_not_depend_on_the_batch(vocab):
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    n = 32
    logits = torch.randn(n, vocab) * torch.tensor([rng.choice([0.5, 2.0, 6.0]) for _ in range(n)]).unsqueeze(1)
    params = mixed_params(rng, n)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] for _ in range(n)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] for _ in range(n)]
    seeds = [1000 + i for i in range(n)]
    batched = run(logits, params, seeds, prompts, outputs)
    assert {p.greedy for p in params} == {True, False} and any(p.has_penalties for p in params)
    for i in range(n):
        alone = run(logits[i:i + 1].clone(), [params[i]], [seeds[i]], [prompts[i]], [outputs[i]])
        assert alone.token_ids[0] == batched.token_ids[i], f"row {i}: {params[i]}"
        assert alone.logprobs[0] == batched.logprobs[i], f"row {i}: {params[i]}"
    # Reordering the batch changes nothing either.
    order = list(reversed(range(n)))
    shuffled = run(logits[order], [params[i] for i in order], [seeds[i] for i in order],
                   [prompts[i] for i in order], [outputs[i] for i in order])
    assert shuffled.token_ids == [batched.token_ids[i] for i in order]


def test_logits_are_not_modified():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=2.0),
              SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(min_p=0.2),
              SamplingParams(temperature=0.7)]
    run(logits, params, prompts=[[1, 2]] * 4, outputs=[[3, 3]] * 4)
    assert torch.equal(logits, before)


def test_greedy_is_argmax_and_uses_no_generator():
    torch.manual_seed(1)
    logits = torch.randn(8, 500)
    out = sample(logits, [SamplingParams(temperature=0)] * 8, [None] * 8, [[]] * 8, [[]] * 8)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 8
    tiny = sample(logits, [SamplingParams(temperature=1e-45)] * 8, [None] * 8, [[]] * 8, [[]] * 8)
    assert tiny.token_ids == out.token_ids


def test_before_read_sees_the_tokens_before_the_host_does():
    """The engine's async-decode hook: called once, with the chosen tokens as a tensor, mixed
    greedy and sampled rows alike; what it returns is ignored."""
    torch.manual_seed(5)
    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=2)] * 2
    gens = [None if p.greedy else make_generator(2, torch.device("cpu")) for p in params]
    seen = []
    out = sample(logits, params, gens, [[]] * 4, [[]] * 4, before_read=lambda t: seen.append(t.clone()) or 7)
    assert len(seen) == 1 and seen[0].tolist() == out.token_ids
    assert out.token_ids[0] == logits[0].argmax().item() and out.token_ids[2] == logits[2].argmax().item()


def test_top_k_1_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(64, 3000) * 4
    greedy = logits.argmax(-1).tolist()
    for temp in (0.3, 1.0, 5.0):
        params = [SamplingParams(temperature=temp, top_k=1)] * 64
        assert run(logits, params).token_ids == greedy
    # With penalties too: top-k 1 picks the penalised argmax, as greedy does.
    prompts = [greedy[i:i + 1] for i in range(64)]
    pen_greedy = run(logits, [SamplingParams(temperature=0, repetition_penalty=3.0)] * 64, prompts=prompts)
    pen_topk = run(logits, [SamplingParams(temperature=1.0, top_k=1, repetition_penalty=3.0)] * 64, prompts=prompts)
    assert pen_topk.token_ids == pen_greedy.token_ids != greedy


def test_penalties_match_vllm_formula():
    rng = random.Random(3)
    torch.manual_seed(3)
    n, v = 200, 40  # a small vocabulary so that repeats are common and penalties decide the argmax
    logits = torch.randn(n, v) * 2
    params, prompts, outputs = [], [], []
    for _ in range(n):
        params.append(SamplingParams(temperature=0, repetition_penalty=rng.choice([1.0, 0.7, 1.5, 3.0]),
                                     frequency_penalty=rng.choice([0.0, -0.5, 0.4, 2.0]),
                                     presence_penalty=rng.choice([0.0, 1.0, -2.0])))
        prompts.append([rng.randrange(v) for _ in range(rng.randrange(0, 10))])
        outputs.append([rng.randrange(v) for _ in range(rng.randrange(0, 10))])
    got = run(logits, params, prompts=prompts, outputs=outputs).token_ids
    want = [int(reference_penalties(logits[i], params[i], prompts[i], outputs[i]).argmax()) for i in range(n)]
    assert got == want
    assert sum(g != int(logits[i].argmax()) for i, g in enumerate(got)) > n // 10  # penalties did matter


def test_logit_bias_is_added_before_the_penalties_row_by_row():
    """OpenAI's logit bias, added before vLLM's penalties (vLLM's order), only to its own row: a
    batch of biased, penalised and plain rows picks what each row's reference picks alone."""
    rng = random.Random(4)
    torch.manual_seed(4)
    n, v = 120, 30
    logits = torch.randn(n, v) * 2
    params, prompts = [], []
    for _ in range(n):
        bias = {rng.randrange(v): rng.choice([-100, -3.0, 2.5, 100]) for _ in range(rng.randrange(0, 4))}
        params.append(SamplingParams(temperature=0, logit_bias=bias or None,
                                     repetition_penalty=rng.choice([1.0, 0.5, 2.0])))
        prompts.append([rng.randrange(v) for _ in range(rng.randrange(0, 6))])
    got = run(logits, params, prompts=prompts).token_ids
    want = []
    for i, p in enumerate(params):
        x = logits[i].clone()
        for t, b in (p.logit_bias or {}).items():
            x[t] += b
        want.append(int(reference_penalties(x, p, prompts[i], []).argmax()))
    assert got == want
    assert sum(g != int(logits[i].argmax()) for i, g in enumerate(got) if params[i].logit_bias) > 10
    assert greedy_one([0.0, 5.0, 1.0], logit_bias={1: -100}) == 2 and greedy_one([0.0, 5.0], logit_bias={0: 100}) == 0
    with pytest.raises(ValueError, match="logit_bias has token ids outside"):
        greedy_one([0.0, 1.0], logit_bias={2: 1.0})


def greedy_one(row, prompt=(), output=(), **kw):
    return run(torch.tensor([row]), [SamplingParams(temperature=0, **kw)], prompts=[list(prompt)],
               outputs=[list(output)]).token_ids[0]


def test_allowed_masks_as_bools_or_additive_offsets_draw_the_same_tokens():
    """Structured outputs hand the sampler cached float offsets (0 / -inf), added to the logits;
    a bool mask (filled) draws exactly the same tokens, always inside the mask."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    masks = [torch.rand(50) < 0.2 for _ in range(6)]
    offsets = [torch.zeros(50).masked_fill_(~m, -math.inf) for m in masks]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, repetition_penalty=1.3), SamplingParams(temperature=0)]
    draws = []
    for allowed in (masks, offsets, [None, *offsets[1:]]):
        gens = [None if p.greedy else make_generator(i, CPU) for i, p in enumerate(params)]
        draws.append(sample(logits, params, gens, [[1, 2]] * 6, [[3]] * 6, allowed=allowed).token_ids)
    assert draws[0] == draws[1] and all(masks[i][t] for i, t in enumerate(draws[1]))
    assert draws[2][0] == int(logits[0].argmax()) and draws[2][1:] == draws[1][1:]  # row 0 unmasked


def test_penalty_directions():
    # Repetition: positive logits are divided, negative ones multiplied; prompt and output both count.
    assert greedy_one([2.0, 1.9, 0.0]) == 0
    assert greedy_one([2.0, 1.9, 0.0], prompt=[0], repetition_penalty=1.2) == 1  # 2.0 / 1.2 < 1.9
    assert greedy_one([2.0, 1.9, 0.0], output=[0], repetition_penalty=1.2) == 1
    assert greedy_one([-1.0, -1.1, -5.0], prompt=[0], repetition_penalty=1.2) == 1  # -1.0 * 1.2 < -1.1
    assert greedy_one([1.9, 2.0, 0.0], prompt=[1], repetition_penalty=0.9) == 1  # < 1 encourages
    # Frequency: once per occurrence, output only.
    assert greedy_one([3.0, 2.5, 0.0], output=[0, 0], frequency_penalty=0.2) == 0  # 3 - 0.4 > 2.5
    assert greedy_one([3.0, 2.5, 0.0], output=[0, 0], frequency_penalty=0.3) == 1  # 3 - 0.6 < 2.5
    assert greedy_one([3.0, 2.5, 0.0], prompt=[0, 0, 0], frequency_penalty=2.0) == 0  # the prompt does not count
    # Presence: once, however often the token occurred; output only.
    assert greedy_one([3.0, 2.5, 0.0], output=[0, 0, 0], presence_penalty=0.4) == 0
    assert greedy_one([3.0, 2.5, 0.0], output=[0], presence_penalty=0.6) == 1
    assert greedy_one([3.0, 2.5, 0.0], prompt=[0], presence_penalty=2.0) == 0
    # Negative frequency/presence penalties encourage repeats.
    assert greedy_one([2.5, 3.0, 0.0], output=[0], presence_penalty=-1.0) == 0


def test_presence_penalty_lowers_sampled_frequency_of_repeats():
    n = 4000
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]]).repeat(n, 1)
    free = run(logits, [SamplingParams()] * n, outputs=[[0]] * n).token_ids
    penal = run(logits, [SamplingParams(presence_penalty=1.5)] * n, outputs=[[0]] * n).token_ids
    assert 0.2 < free.count(0) / n < 0.3
    # p(0) = e^-1.5 / (e^-1.5 + 3) = 0.069
    assert 0.05 < penal.count(0) / n < 0.09


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.2),
                                dict(temperature=2.0, top_k=4, top_p=0.9, min_p=0.05)])
def test_draws_follow_the_filtered_distribution(kw):
    n = 20000
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(**kw)
    want = reference_filter(base, p).softmax(-1)
    got = torch.bincount(torch.tensor(run(base.repeat(n, 1), [p] * n).token_ids), minlength=6).float() / n
    assert torch.all(got[want == 0] == 0), (got, want)
    assert torch.allclose(got, want, atol=0.015), (got, want)


@pytest.mark.parametrize("kw", [dict(), dict(min_p=0.05), dict(top_p=0.95)])
def test_draws_over_a_wide_vocabulary_follow_the_distribution(kw):
    # Wide rows are drawn in two levels (blocks, then columns); mass sits in the first block, a middle
    # one, the partial last block and the very last column.
    n, v = 20000, 1037
    base = torch.linspace(-4.0, -5.0, v)  # distinct: the sort-based reference splits ties differently
    hot = [5, 300, 301, 1030, 1036]
    base[hot] = torch.tensor([2.0, 1.0, 1.5, 0.5, 1.2])
    p = SamplingParams(**kw)
    want = reference_filter(base, p).softmax(-1)
    got = torch.bincount(torch.tensor(run(base.repeat(n, 1), [p] * n).token_ids), minlength=v).float() / n
    assert torch.all(got[want == 0] == 0)
    assert torch.allclose(got[hot], want[hot], atol=0.015), (got[hot], want[hot])
    assert abs(float(got.sum() - got[hot].sum()) - float(want.sum() - want[hot].sum())) < 0.015


def test_filter_logits_keeps_what_the_sort_based_filter_kept():
    rng = random.Random(4)
    torch.manual_seed(4)
    for trial in range(60):
        v = rng.choice([7, 100, 5000])
        row = torch.randn(v) * rng.choice([0.3, 1.0, 8.0])  # flat rows make top-p grow past its first lists
        p = SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, -1, 1, 10, 64, 200, v + 5]),
                           top_p=rng.choice([1.0, 0.3, 0.9, 0.999]), min_p=rng.choice([0.0, 0.01, 0.3]))
        kept = torch.isfinite(filter_logits(row, p))
        assert torch.equal(kept, torch.isfinite(reference_filter(row, p))), (trial, p)
        # And the sampler only ever draws from that set.
        tokens = run(row.repeat(50, 1), [p] * 50).token_ids
        assert all(kept[t] for t in tokens), (trial, p)


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.01) == [0]
    p = logits.softmax(-1)
    assert kept(top_p=float(p[0] + p[1] - 1e-4)) == [0, 1]  # smallest prefix reaching the mass
    assert kept(min_p=0.3) == [0, 1]  # p[1]/p[0] = e^-1 = 0.37 >= 0.3, p[2]/p[0] = 0.14 < 0.3
    assert kept() == [0, 1, 2, 3, 4]
    # Tokens tied with the k-th logit are kept, as the threshold rule always did.
    assert torch.isfinite(filter_logits(torch.tensor([3.0, 2.0, 2.0, 1.0]), SamplingParams(top_k=2))).tolist() == [
        True, True, True, False]


def test_logprobs_are_the_raw_log_softmax_with_rank_and_top():
    torch.manual_seed(5)
    n, v = 12, 700
    logits = torch.randn(n, v) * 3
    ks = [None, 0, 1, 5, 20, 3] * 2
    params = [SamplingParams(temperature=0.8 if i % 2 else 0.0, logprobs=k, repetition_penalty=1.5)
              for i, k in enumerate(ks)]
    out = run(logits, params, prompts=[list(range(50))] * n)
    lsm = logits.log_softmax(-1)
    for i, k in enumerate(ks):
        lp = out.logprobs[i]
        if k is None:
            assert lp is None
            continue
        assert isinstance(lp, TokenLogprobs) and lp.token_id == out.token_ids[i]
        # The raw model distribution: no penalty or temperature in it.
        assert lp.logprob == pytest.approx(float(lsm[i, lp.token_id]), abs=1e-6)
        assert lp.rank == 1 + int((lsm[i] > lsm[i, lp.token_id]).sum())
        want = torch.topk(lsm[i], k)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert [x for _, x in lp.top] == pytest.approx(want.values.tolist(), abs=1e-6)
        assert len(lp.top) == k
    assert out.logprobs[0] is None and out.logprobs[2].rank == 1  # greedy picks the most likely


def test_seeds_reproduce_and_differ():
    torch.manual_seed(6)
    logits = torch.randn(16, 1000)
    p = [SamplingParams(temperature=1.0)] * 16
    a = run(logits, p, seeds=[7] * 16).token_ids
    b = run(logits, p, seeds=[7] * 16).token_ids
    c = run(logits, p, seeds=[8] * 16).token_ids
    assert a == b and a != c
    # An unseeded generator (None) draws from torch's default RNG.
    out = sample(logits, p, [None] * 16, [[]] * 16, [[]] * 16)
    assert all(0 <= t < 1000 for t in out.token_ids)


def test_sample_validates_its_inputs():
    logits = torch.zeros(2, 10)
    ok = dict(params=[SamplingParams()] * 2, generators=[None] * 2, prompt_ids=[[]] * 2, output_ids=[[]] * 2)
    with pytest.raises(ValueError, match="^generators"):
        sample(logits, **{**ok, "generators": [None]})
    with pytest.raises(ValueError, match="^logits"):
        sample(torch.zeros(10), **ok)
    with pytest.raises(ValueError, match="output_ids"):
        sample(logits, **{**ok, "params": [SamplingParams(presence_penalty=1.0)] * 2, "output_ids": [[10], [1]]})
    # Tensors are accepted for the ids, as well as lists.
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)] * 2, [None] * 2,
                 [torch.tensor([0, 1]), (2,)], [torch.tensor([], dtype=torch.long), [3]])
    assert out.token_ids == [0, 0]


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


def test_penalised_generation_repeats_less(model):
    prompt = [[3, 4, 5]]
    free = generate(model, prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].token_ids
    pen = generate(model, prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                 presence_penalty=2.0, frequency_penalty=2.0,
                                                 repetition_penalty=2.0))[0].token_ids
    assert len(set(pen)) > len(set(free))


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
